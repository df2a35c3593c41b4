"""This process's share of a batch or a study under `accelerate launch` or torchrun: item i runs in process
i mod WORLD_SIZE, each process on its own GPU."""

import os
from dataclasses import dataclass


@dataclass
class Shard:
    """This process's share: rank of size (1 of 1 without a launcher)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    accelerate_cpu: bool = False  # started by `accelerate launch --cpu`

    @classmethod
    def from_environment(cls):
        # accelerate launch (multi-process) and torchrun both set these.
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                   accelerate_cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))

    def owns(self, item) -> bool:
        """Whether a prompt or an example (anything with an index) runs in this process."""
        return item.index % self.size == self.rank

    def device(self, device: str) -> str:
        """One GPU per process: 'auto' and 'cuda' mean this process's GPU."""
        import torch

        if self.size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        if self.accelerate_cpu and device == "auto":
            return "cpu"
        return device
