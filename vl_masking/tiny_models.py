"""Random-weight models built from a config, saved like a hub checkpoint.

Used by the tests, `make demo` and the benchmarks: no model hub is needed. Each
builder writes a directory that loads through the same `--model PATH` code that
users run. The tokenizer is the real Qwen3 one (vendored in vl_masking/assets), so
special-token ids (151643-151668) are the real ones; a Qwen3-VL directory carries the
Qwen3-VL Instruct chat template, as the real checkpoints do.

    python -m vl_masking.tiny_models .cache/tiny-qwen3-vl               # Qwen3-VL (the demo's)
    python -m vl_masking.tiny_models .cache/tiny-qwen3 --kind qwen3      # a text model for mask_impact_analysis.py
    python -m vl_masking.tiny_models .cache/tiny-llava --kind llava      # LLaVA-1.5 (CLIP tower, Llama decoder)
    python -m vl_masking.tiny_models .cache/tiny-gemma3 --kind gemma3    # Gemma 3 (SigLIP tower, pooled 4x4 grid)
"""

import json
import shutil
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "qwen3_tokenizer"
VL_CHAT_TEMPLATE = ASSETS / "qwen3_vl_instruct_chat_template.jinja"
VOCAB_SIZE = 151936
IM_END_ID = 151645
ENDOFTEXT_ID = 151643
TEXT_KINDS = ("qwen3", "qwen2", "llama", "mistral", "gemma3_text")
IMAGE_TOKEN = "<image>"  # LLaVA's image placeholder, added to the Qwen3 tokenizer as a special token
# A LLaVA-1.5-style chat template ("USER: <image>\n... ASSISTANT:"), written for these test models.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _copy_tokenizer(out: Path, chat_template: str | None = None) -> None:
    """The Qwen3 tokenizer; with chat_template, that template instead of the Qwen3 text one."""
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        config.pop("chat_template", None)
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def qwen3_vl_config(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    vision_depth=2, vision_hidden=32, vision_heads=2, deepstack=(0, 1), moe_experts=0,
                    experts_per_token=2, vision_intermediate=0):
    """A Qwen3-VL config with real token ids and tiny (or chosen) widths (the tower's MLP: vision_intermediate,
    or 2 x its width)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    half = head_dim // 2
    t_sec = half - 2 * (half * 3 // 8)
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                         "mrope_section": [t_sec, half * 3 // 8, half * 3 // 8], "mrope_interleaved": True},
        eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID,
    )
    vision = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_heads=vision_heads, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=256, deepstack_visual_indexes=list(deepstack),
    )
    common = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653, tie_word_embeddings=False)
    if moe_experts:
        text.update(num_experts=moe_experts, num_experts_per_tok=experts_per_token,
                    moe_intermediate_size=intermediate // 2, decoder_sparse_step=1, mlp_only_layers=[])
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **common)
    return Qwen3VLConfig(text_config=text, vision_config=vision, **common)


def image_processor_config(min_pixels=32 * 32, max_pixels=1024 * 1024 * 4):
    """Qwen3-VL's image-processor settings; a small minimum keeps tiny images tiny (160x96 -> 3x5 tokens)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }


def build_qwen3_vl(out, seed=0, dtype=torch.float32, **config_kwargs) -> Path:
    """Write a random-weight Qwen3-VL (model, tokenizer, image processor) to `out`."""
    from transformers import AutoModelForImageTextToText

    from .inputs import quiet_transformers

    quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = qwen3_vl_config(**config_kwargs)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    model.save_pretrained(out)
    _copy_tokenizer(out, VL_CHAT_TEMPLATE.read_text(encoding="utf-8"))
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor_config(), indent=2))
    return out


def qwen2_vl_config(model_type="qwen2_vl", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                    vision_depth=2, vision_hidden=32, vision_heads=2):
    """A Qwen2-VL or Qwen2.5-VL config with real token ids and tiny widths (no DeepStack)."""
    from transformers import AutoConfig

    half = head_dim // 2
    t_sec = half - 2 * (half * 3 // 8)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [t_sec, half * 3 // 8, half * 3 // 8]},
                eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID)
    if model_type == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2,
                      num_heads=vision_heads, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    else:
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      out_hidden_size=hidden, num_heads=vision_heads, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=64, fullatt_block_indexes=[vision_depth - 1])
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, image_token_id=151655,
                                video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                                tie_word_embeddings=False)


def build_qwen2_vl(out, model_type="qwen2_vl", seed=0, dtype=torch.float32, **config_kwargs) -> Path:
    """Write a random-weight Qwen2-VL / Qwen2.5-VL (model, tokenizer, image processor, chat template) to `out`."""
    return _save_vl(out, qwen2_vl_config(model_type, **config_kwargs), seed, dtype,
                    VL_CHAT_TEMPLATE.read_text(encoding="utf-8"), image_processor_config())


def llava_config(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vision_layers=2,
                 vision_hidden=32, vision_heads=2, image_size=56, patch_size=14, image_token_id=None):
    """A LLaVA-1.5 config: a CLIP vision tower (image_size / patch_size patches a side) and a Llama decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, max_position_embeddings=4096, eos_token_id=IM_END_ID,
                       bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       image_seq_length=(image_size // patch_size) ** 2, tie_word_embeddings=False)


def clip_processor_config(size=56):
    """LLaVA-1.5's CLIP processing at a tiny size: shortest edge resized to `size`, the centre square cut."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _vl_tokenizer(out: Path, tokens, chat_template=None):
    """The Qwen3 tokenizer in `out` with the family's image tokens added as special tokens, and its chat
    template (none: the Qwen3 text template would not place images, the adapter's built-in format is used)."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(out, chat_template)
    if chat_template is None:
        config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    tokenizer.save_pretrained(out)
    return tokenizer


def build_llava(out, seed=0, dtype=torch.float32, **config_kwargs) -> Path:
    """Write a random-weight LLaVA-1.5 (model, tokenizer with <image>, CLIP processor, chat template) to `out`."""
    out = Path(out)
    tokenizer = _vl_tokenizer(out, [IMAGE_TOKEN], LLAVA_CHAT_TEMPLATE)
    config = llava_config(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **config_kwargs)
    return _save_vl(out, config, seed, dtype, None, clip_processor_config(config.vision_config.image_size))


# Gemma 3's image and turn tokens, added to the Qwen3 tokenizer as special tokens (no chat template:
# the adapter's built-in Gemma chat format is used).
GEMMA3_TOKENS = ("<image_soft_token>", "<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>")


def gemma3_config(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vision_layers=2,
                  vision_hidden=32, vision_heads=2, image_size=64, patch_size=8, tokens_per_image=16,
                  sliding_window=24, token_ids=(0, 0, 0)):
    """A Gemma 3 config: a SigLIP tower of (image_size / patch_size)^2 patches pooled to tokens_per_image, a
    Gemma 3 decoder whose layers are sliding-window except every fourth (as the real 5:1 pattern, shortened)."""
    from transformers import Gemma3Config

    image_id, start_id, end_id = token_ids
    kinds = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)]
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                query_pre_attn_scalar=head_dim, max_position_embeddings=4096, sliding_window=sliding_window,
                layer_types=kinds, eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                        image_token_id=image_id, boi_token_id=start_id, eoi_token_id=end_id, tie_word_embeddings=False)


def gemma3_processor_config(size=64):
    """Gemma 3's processing at a tiny size: the picture resized (stretched) to size x size, no pan-and-scan."""
    return {"image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
            "do_pan_and_scan": False}


def build_gemma3(out, seed=0, dtype=torch.float32, **config_kwargs) -> Path:
    """Write a random-weight Gemma 3 (model, tokenizer with Gemma's image and turn tokens, processor) to `out`."""
    out = Path(out)
    tokenizer = _vl_tokenizer(out, list(GEMMA3_TOKENS))
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_TOKENS[:3])
    config = gemma3_config(token_ids=ids, **config_kwargs)
    return _save_vl(out, config, seed, dtype, None, gemma3_processor_config(config.vision_config.image_size))


LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]  # 336-pixel tiles, shrunk to 56


def build_llava_next(out, seed=0, dtype=torch.float32, **config_kwargs) -> Path:
    """Write a random-weight LLaVA-NeXT (model, tokenizer with <image>, any-resolution processor, template)."""
    from transformers import LlavaNextConfig

    out = Path(out)
    tokenizer = _vl_tokenizer(out, [IMAGE_TOKEN], LLAVA_CHAT_TEMPLATE)
    base = llava_config(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **config_kwargs)
    config = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                             image_token_index=base.image_token_id, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             tie_word_embeddings=False)
    size = config.vision_config.image_size
    processor = {**clip_processor_config(size), "image_processor_type": "LlavaNextImageProcessor",
                 "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS, "do_pad": True}
    return _save_vl(out, config, seed, dtype, None, processor)


def build_llava_onevision(out, seed=0, dtype=torch.float32, layers=3, hidden=64, most_tiles=1) -> Path:
    """Write a random-weight LLaVA-OneVision (SigLIP tower, Qwen2 decoder, any-resolution processor); with
    anyres_max_1 (`most_tiles`) a mosaic of more than one tile's cells is resampled, as the real 9 allows."""
    from transformers import LlavaOnevisionConfig

    out = Path(out)
    tokenizer = _vl_tokenizer(out, [IMAGE_TOKEN, "<video>"])
    size = 56
    text = dict(model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=size, patch_size=14)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_aspect_ratio=f"anyres_max_{most_tiles}",
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  tie_word_embeddings=False)
    processor = {"image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
                 "size": {"height": size, "width": size}, "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
                 "do_pad": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "resample": 3}
    out = _save_vl(out, config, seed, dtype, None, processor)
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": size, "width": size},
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return out


# Idefics3's and SmolVLM's image and marker tokens, added to the Qwen3 tokenizer (no chat template: the
# adapter's built-in "User: ... Assistant:" format is used).
IDEFICS3_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))


def build_idefics3(out, model_type="idefics3", seed=0, dtype=torch.float32, layers=3, hidden=64) -> Path:
    """Write a random-weight Idefics3 or SmolVLM: a SigLIP-like tower of 8 x 8 patches per 32-pixel tile,
    pixel-shuffled 2 x 2 into 4 x 4 tokens, pictures resized to at most 64 px and split into tiles."""
    from transformers import AutoConfig

    out = Path(out)
    tokenizer = _vl_tokenizer(out, list(IDEFICS3_TOKENS))
    tile = 32
    text = dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=4096, eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID,
                pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=tile,
                  patch_size=4)
    config = AutoConfig.for_model(model_type, vision_config=vision, text_config=text, scale_factor=2,
                                  image_token_id=tokenizer.convert_tokens_to_ids(IDEFICS3_TOKENS[0]),
                                  tie_word_embeddings=False)
    processor = {"image_processor_type": "SmolVLMImageProcessor" if model_type == "smolvlm" else
                 "Idefics3ImageProcessor", "do_resize": True, "size": {"longest_edge": 2 * tile},
                 "max_image_size": {"longest_edge": tile}, "do_image_splitting": True, "do_pad": True,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "resample": 1}
    return _save_vl(out, config, seed, dtype, None, processor)


# InternVL's image tokens, added to the Qwen3 tokenizer (no chat template: the adapter's built-in
# ChatML format is used).
INTERNVL_TOKENS = ("<IMG_CONTEXT>", "<img>", "</img>")


def internvl_config(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vision_layers=2, vision_hidden=32,
                    vision_heads=2, image_size=64, patch_size=8, image_token_id=0):
    """An InternVL config: an InternViT tower of (image_size / patch_size)^2 patches per tile, pixel-shuffled
    2 x 2 (downsample_ratio 0.5), and a Qwen2 decoder (as InternVL3's)."""
    from transformers import InternVLConfig

    text = dict(model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, eos_token_id=IM_END_ID, bos_token_id=ENDOFTEXT_ID,
                pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False)
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, image_size=[image_size, image_size],
                  patch_size=[patch_size, patch_size])
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                          downsample_ratio=0.5, tie_word_embeddings=False)


def internvl_processor_config(size=64, max_patches=6):
    """GOT-OCR2's processing at a tiny size: tiles of size x size (1 to max_patches of them) and a thumbnail."""
    return {"image_processor_type": "GotOcr2ImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
            "crop_to_patches": True, "min_patches": 1, "max_patches": max_patches, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True}


def build_internvl(out, seed=0, dtype=torch.float32, max_patches=6, **config_kwargs) -> Path:
    """Write a random-weight InternVL (model, tokenizer with <img>, </img>, <IMG_CONTEXT>, tiling processor)."""
    out = Path(out)
    tokenizer = _vl_tokenizer(out, list(INTERNVL_TOKENS))
    config = internvl_config(image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS[0]), **config_kwargs)
    return _save_vl(out, config, seed, dtype, None,
                    internvl_processor_config(config.vision_config.image_size[0], max_patches))


def _save_vl(out, config, seed, dtype, chat_template, processor_config) -> Path:
    from transformers import AutoModelForImageTextToText

    from .inputs import quiet_transformers

    quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    model.save_pretrained(out)
    if chat_template is not None:
        _copy_tokenizer(out, chat_template)
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    return out


def build_causal_lm(out, model_type="qwen3", seed=0, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                    intermediate=128, dtype=torch.float32, **extra) -> Path:
    """Write a random-weight causal LM of `model_type` with the Qwen3 tokenizer to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .inputs import quiet_transformers

    quiet_transformers()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, max_position_embeddings=4096, eos_token_id=IM_END_ID,
                  bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False)
    fields.update(extra)
    config = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    model.generation_config.pad_token_id = ENDOFTEXT_ID
    model.save_pretrained(out)
    _copy_tokenizer(out)
    return out


# -- painted clips: frames that can be told apart (the video tests and bench/check_video_processor.py) --

CLIP_SIZE = (100, 70)  # width, height: no multiple of any patch, so a processor resizes every frame


def painted_frame(k: int, width: int = CLIP_SIZE[0], height: int = CLIP_SIZE[1]):
    """Frame k: a colour of its own (blue 67 k mod 256) and a bar that moves, so that frames and their order show."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 2 + 23 * k) % 256, (y * 3 + 41 * k) % 256, np.full_like(x, (67 * k) % 256)], -1)
    frame[:, (7 * k) % width:(7 * k) % width + 9] = 255
    return frame.astype(np.uint8)


def write_clip(path, codec: str, frames: int, rate: int, pix_fmt: str = "yuv420p") -> Path:
    """A video file of `frames` painted frames at `rate` frames per second (PyAV: libx264, libvpx-vp9, gif, ...)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = *CLIP_SIZE, pix_fmt
        for k in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(painted_frame(k), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


# --kind -> builder of the vision-language families (each takes out, layers, hidden)
VL_BUILDERS = {
    "qwen3_vl": build_qwen3_vl,
    "qwen2_vl": lambda out, **kw: build_qwen2_vl(out, model_type="qwen2_vl", **kw),
    "qwen2_5_vl": lambda out, **kw: build_qwen2_vl(out, model_type="qwen2_5_vl", **kw),
    "llava": build_llava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "gemma3": build_gemma3,
    "internvl": build_internvl,
    "idefics3": build_idefics3,
    "smolvlm": lambda out, **kw: build_idefics3(out, model_type="smolvlm", **kw),
}
VL_KINDS = tuple(VL_BUILDERS)


def main(argv=None) -> Path:
    import argparse

    parser = argparse.ArgumentParser(description="Build a random-weight model directory (demo, trying things offline).")
    parser.add_argument("out")
    parser.add_argument("--kind", default="qwen3_vl", choices=(*VL_KINDS, *TEXT_KINDS),
                        help="a vision-language family for mask_impact_vl.py; a text architecture for "
                             "mask_impact_analysis.py")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    build = VL_BUILDERS.get(args.kind) or (lambda out, **kw: build_causal_lm(out, model_type=args.kind, **kw))
    path = build(args.out, layers=args.layers, hidden=args.hidden)
    print(f"built a random-weight {args.kind} ({args.layers} layers, hidden {args.hidden}) in {path}")
    return path


if __name__ == "__main__":
    main()
