"""Qwen-Image-Edit at full size with random weights: the real F2P throughput on a GPU
without the 60 GB of weights (random bf16 weights cost the same compute as trained ones).

diffusers' classes at the published sizes (the 60-layer QwenImageTransformer2DModel and
AutoencoderKLQwenImage at their defaults, Qwen2.5-VL-7B from its published config below),
built straight on the device in bf16 (no download, no CPU copy) and initialised there.
diffusers rather than DiffSynth here because its dependencies fit the GPU machine's carry
(DiffSynth's pull in modelscope's); the architecture and its compute are the same, and
`meta` checks the sizes against DiffSynth's own full-size classes where it is installed.
The tokenizer is the tiny fixture's (models/f2p-tiny: no real vocabulary can be fetched;
token ids only index the embedding) with the real processor's image sizes, so the text
encoder sees as many vision tokens as with the published processor.

    f2p_full.py meta               build on the meta device; print and check the parameter
                                   counts (runs on any CPU: tests/it/f2p.rs)
    f2p_full.py alone FACES OUT    on cuda:0: the pipeline alone over the face crops in
                                   FACES, 2 at 40 steps with CFG then all at 8 steps without;
                                   seconds per image and peak memory as JSON into OUT

`RandomF2P` is examples/f2p's class with only the loading replaced: hotpipe runs it as a
Python pipeline (`entry = "f2p_full.py:RandomF2P"`, `library = "diffusers"`;
scripts/device_f2p.sh).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for d in (HERE, HERE.parent / "examples/f2p"):
    if (d / "pipeline.py").is_file():
        sys.path.insert(0, str(d))
        break
from pipeline import F2P  # noqa: E402

# Published sizes, in parameters: the transformer ~20.4 B, the text encoder ~8.3 B
# (Qwen2.5-VL-7B with its vision tower and LM head), the VAE ~0.13 B.
EXPECTED = {"transformer": (19.5e9, 21.5e9), "text_encoder": (7.8e9, 8.8e9),
            "vae": (0.10e9, 0.16e9)}
# Qwen-Image's text_encoder/config.json (Qwen2.5-VL-7B-Instruct), in transformers 5's form.
QWEN25_VL_7B = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                            "rope_theta": 1000000.0},
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "in_channels": 3,
    },
    "tie_word_embeddings": False,
}
# Qwen2.5-VL's processor (preprocessor_config.json of Qwen-Image-Edit).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384
SETTINGS = [("40 steps, CFG 4", 40, 4.0, 2), ("8 steps, no CFG", 8, 1.0, None)]
TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
          "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def build(device, dtype, tokenizer):
    """The full-size models, made on `device` in `dtype`; the text encoder looks for the
    image by `tokenizer`'s ids."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in TOKENS.items()}
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return {
                "transformer": QwenImageTransformer2DModel(),
                "text_encoder": Qwen2_5_VLForConditionalGeneration(
                    Qwen2_5_VLConfig(**QWEN25_VL_7B, **ids)),
                "vae": AutoencoderKLQwenImage(),
            }
    finally:
        torch.set_default_dtype(before)


def counts(models):
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def processor(fixture, model):
    from transformers import Qwen2VLProcessor

    proc = Qwen2VLProcessor.from_pretrained(os.path.join(fixture, model, "processor"))
    proc.image_processor.min_pixels, proc.image_processor.max_pixels = MIN_PIXELS, MAX_PIXELS
    proc.image_processor.size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return proc


class RandomF2P(F2P):
    """examples/f2p's F2P (library = "diffusers") with random full-size weights instead of
    loaded ones; `models` names the fixture, for its tokenizer."""

    def _diffusers(self):
        import diffusers

        cls = {"edit": diffusers.QwenImageEditPipeline,
               "edit-plus": diffusers.QwenImageEditPlusPipeline}[self.kind]
        proc = processor(self.models, self.model)
        torch.manual_seed(0)
        m = build(self.device, self.dtype, proc.tokenizer)
        self.params = counts(m)
        pipe = cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=m["vae"],
                   text_encoder=m["text_encoder"], tokenizer=proc.tokenizer, processor=proc,
                   transformer=m["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def describe(self):
        return dict(super().describe(), weights="random, full size", parameters=self.params)


def fixture():
    return os.environ.get("HOTPIPE_F2P_FIXTURE", str(HERE.parent / "models/f2p-tiny"))


def meta():
    """The models at full size on the meta device (no memory), counted; and RandomF2P
    assembled there (its processor and the token ids the text encoder looks for)."""
    gen = RandomF2P("meta", {"library": "diffusers", "models": fixture(), "height": 1024,
                             "width": 1024})
    got = gen.params
    tok = gen.pipe.processor.tokenizer
    ids = gen.pipe.text_encoder.config.image_token_id, tok.convert_tokens_to_ids("<|image_pad|>")
    bad = {k: n for k, n in got.items() if not EXPECTED[k][0] <= n <= EXPECTED[k][1]}
    report = {"parameters": got, "image_token_id": ids,
              "max_pixels": gen.pipe.processor.image_processor.max_pixels, "ok": not bad}
    try:  # DiffSynth's own full-size classes, where it is installed: the same sizes
        from diffsynth.models.qwen_image_dit import QwenImageDiT
        from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
        from diffsynth.models.qwen_image_vae import QwenImageVAE

        with torch.device("meta"):
            ds = counts({"transformer": QwenImageDiT(), "text_encoder": QwenImageTextEncoder(),
                         "vae": QwenImageVAE()})
        report["diffsynth_parameters"] = ds
    except ImportError:
        pass
    print(json.dumps(report))
    if bad:
        sys.exit(f"parameter counts outside the published sizes: {bad}")


def alone(faces, out):
    import numpy as np
    from PIL import Image

    t = time.perf_counter()
    gen = RandomF2P("cuda:0", {"library": "diffusers", "models": fixture(), "height": 1024,
                               "width": 1024})
    report = {"build_s": time.perf_counter() - t, "parameters": gen.params}
    crops = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(faces).iterdir())]
    params = {"prompt": "a woman in a red coat walking in a park, full body", "negative_prompt": "",
              "seed": 0}
    t = time.perf_counter()
    gen(crops[0][None], [dict(params, steps=2, cfg_scale=4.0)])  # warm-up
    report["warmup_s"] = time.perf_counter() - t
    for name, steps, cfg, n in SETTINGS:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for face in crops[:n]:
            gen(face[None], [dict(params, steps=steps, cfg_scale=cfg)])
        torch.cuda.synchronize()
        took = time.perf_counter() - t
        report[name] = {"images": len(crops[:n]), "s_per_image": took / len(crops[:n])}
        print(name, report[name], flush=True)
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "meta":
        meta()
    else:
        alone(sys.argv[2], sys.argv[3])
