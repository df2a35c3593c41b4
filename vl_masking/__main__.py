"""`python -m vl_masking vl|text|figures|viewers ARGS`: the four commands without installed scripts."""

import sys

from .cli import main
from .tools import TEXT, VL

COMMANDS = {"vl": "vision-language models (as mask-impact-vl)", "text": "causal LMs (as mask-impact)",
            "figures": "figures from result files (as mask-impact-figures)",
            "viewers": "where the two viewer pages are (as mask-impact-viewers)"}

if __name__ == "__main__":
    name, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if name not in COMMANDS:
        lines = "\n".join(f"  {key:8} {text}" for key, text in COMMANDS.items())
        print(f"usage: python -m vl_masking {{{','.join(COMMANDS)}}} ARGS\n{lines}", file=sys.stderr)
        sys.exit(0 if name in ("-h", "--help") else 2)
    prog = f"python -m vl_masking {name}"
    if name == "figures":
        from .figures import command

        command(rest, prog=prog)
    elif name == "viewers":
        from .viewers import command

        command()
    else:
        main(VL if name == "vl" else TEXT, rest, prog=prog)
