"""Build the tiny Qwen-Image-Edit fixture: the published architecture at toy sizes, with
random weights, laid out so that both DiffSynth-Studio and diffusers load it with their
own loaders, offline. The tests run the real pipeline code on it through hotpipe
(examples/f2p/pipeline.py, the class a GPU user runs).

    python scripts/f2p_tiny/make.py OUT      # the generator venv's python

OUT (about 0.8 MB, byte-identical for the same versions):

    Qwen/Qwen-Image-Edit/        a diffusers pipeline folder (model_index.json, scheduler,
                                 text_encoder, tokenizer, processor, transformer, vae):
                                 what `QwenImageEditPipeline.from_pretrained` and, through
                                 `[model.options] models = OUT`, DiffSynth's
                                 `ModelConfig(model_id="Qwen/Qwen-Image-Edit", ...)` read
    Qwen/Qwen-Image              -> Qwen-Image-Edit (the text encoder and VAE are shared,
                                 as DiffSynth's example loads them from Qwen/Qwen-Image)
    Qwen/Qwen-Image-Edit-2509    -> Qwen-Image-Edit (for QwenImageEditPlusPipeline)
    lora/f2p-tiny.safetensors    a LoRA on the transformer in the key format DiffSynth's
                                 training writes (`<module>.lora_A.default.weight`), as
                                 the F2P LoRA is
    diffsynth/                   put on PYTHONPATH for DiffSynth: registers the tiny files
                                 in `diffsynth.configs.MODEL_CONFIGS` (DiffSynth knows a
                                 model file only by the hash of its keys and shapes, and
                                 builds its classes at full size; see hotpipe_f2p_tiny.py)

Sizes (../shared/f2p-tiny/NOTES.md has why): transformer 2 layers of 2 heads x 16 with 16
latent channels; VAE base_dim 8, scale factor 8, no residual blocks (a 1024 px VAE encode
stays cheap); Qwen2.5-VL text encoder hidden 16, 2 layers, vision tower depth 2. The
added-key norms of the transformer's text stream are scaled up (TEXT_KEY_GAIN): with
random weights the ~60 text tokens are otherwise drowned by the 4,096 image tokens in
joint attention, and a prompt would change the output by under one level in 255.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEED = 20261207
TEXT_KEY_GAIN = 4.0
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5-VL).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate.",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:",
    "a woman in a red coat walking in a park, full body, photo",
    "a man in a grey suit standing on a street at night, full body portrait",
    "blurry, low quality, deformed hands, extra fingers, watermark, text",
    "Picture 1: Picture 2: system user assistant",
    "0123456789 ,.;:!?-_()[]{}'\"/\\ \n\t",
]


def tokenizer():
    """A byte-level BPE of 512 tokens with Qwen2's pre-tokenizer and special tokens, as
    transformers' Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=32768,
    )


def processor(tok):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # 56x56 to 112x112 pixels: at most 16 vision tokens per image.
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    videos = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos)


def text_encoder(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = {
        "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                            "rope_theta": 1000000.0},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
        "out_hidden_size": 16, "fullatt_block_indexes": [1], "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    }
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED + 1)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def transformer():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(SEED + 2)
    m = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ).eval()
    with torch.no_grad():
        for block in m.transformer_blocks:
            block.attn.norm_added_k.weight.mul_(TEXT_KEY_GAIN)
    return m


def vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(SEED + 3)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=0,
        temperal_downsample=[False, True, True],
    ).eval()


def lora(dit, rank=2):
    """A LoRA over every attention projection of the transformer, in DiffSynth's
    training format; large enough that applying it visibly changes the output."""
    g = torch.Generator().manual_seed(SEED + 4)
    out = {}
    for name, module in dit.named_modules():
        if name.split(".")[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                   "add_v_proj", "to_add_out") or name.endswith("to_out.0"):
            o, i = module.weight.shape
            out[f"{name}.lora_A.default.weight"] = torch.randn(rank, i, generator=g) * 0.5
            out[f"{name}.lora_B.default.weight"] = torch.randn(o, rank, generator=g) * 0.5
    return out


def build(out: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
    from safetensors.torch import save_file

    tok = tokenizer()
    proc = processor(tok)
    dit = transformer()
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=text_encoder(tok),
        tokenizer=tok, processor=proc, transformer=dit,
    )
    edit = out / "Qwen" / "Qwen-Image-Edit"
    pipe.save_pretrained(edit)
    # DiffSynth's example reads the processor from processor/ (diffusers saves it inside
    # the pipeline folder under that name already) and the tokenizer from tokenizer/.
    for alias in ("Qwen-Image", "Qwen-Image-Edit-2509"):
        os.symlink("Qwen-Image-Edit", out / "Qwen" / alias)
    (out / "lora").mkdir()
    save_file(lora(dit), out / "lora" / "f2p-tiny.safetensors", metadata={"format": "pt"})
    shim = out / "diffsynth"
    shim.mkdir()
    for f in ("hotpipe_f2p_tiny.py", "sitecustomize.py"):
        shutil.copy(HERE / f, shim / f)
    sys.path.insert(0, str(shim))
    import hotpipe_f2p_tiny

    (shim / "model_configs.json").write_text(
        json.dumps(hotpipe_f2p_tiny.entries_for(edit), indent=1, sort_keys=True) + "\n"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"{args.out}: {total} bytes")


if __name__ == "__main__":
    main()
