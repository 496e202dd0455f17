"""The tiny Qwen-Image-Edit fixture's models as DiffSynth-Studio classes, and their entries
for DiffSynth's model registry.

DiffSynth 2.1.12 builds its Qwen-Image classes at full size (`QwenImageDiT(num_layers=60)`
with a fixed 3072-wide block, `QwenImageTextEncoder()` with a fixed 7B config) and knows a
weights file only by the md5 of its sorted `key:shape` strings
(`diffsynth.core.loader.hash_model_file`), looked up in the plain list
`diffsynth.configs.MODEL_CONFIGS`. The subclasses below replace only `__init__`, building
DiffSynth's own submodules (same attribute names, so the same state-dict keys) at the
fixture's sizes; everything else (forward, the pipeline, the loader, the LoRA fuser) is
DiffSynth's code. The VAE class takes its sizes as arguments and is used as it is.

`entries_for()` makes the registry entries (scripts/f2p_tiny/make.py writes them to
`model_configs.json`); `sitecustomize.py` beside this file appends them to `MODEL_CONFIGS`
as soon as `diffsynth.configs` is imported, so a process started with this folder on
PYTHONPATH loads the fixture through DiffSynth's unchanged loader, which imports the
classes below by their dotted names.
"""

import json
from pathlib import Path

from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings
from diffsynth.models.qwen_image_dit import QwenEmbedRope, QwenImageDiT, QwenImageTransformerBlock
from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
from torch import nn


class TinyQwenImageDiT(QwenImageDiT):
    def __init__(self, num_layers, heads, head_dim, text_dim, axes_dim):
        nn.Module.__init__(self)
        dim = heads * head_dim
        self.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(axes_dim), scale_rope=True)
        self.time_text_embed = TimestepEmbeddings(
            256, dim, diffusers_compatible_format=True, scale=1000, align_dtype_to_timestep=False
        )
        self.txt_norm = RMSNorm(text_dim, eps=1e-6)
        self.img_in = nn.Linear(64, dim)
        self.txt_in = nn.Linear(text_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
             for _ in range(num_layers)]
        )
        self.norm_out = AdaLayerNorm(dim, single=True)
        self.proj_out = nn.Linear(dim, 64)


class TinyQwenImageTextEncoder(QwenImageTextEncoder):
    def __init__(self, config):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        nn.Module.__init__(self)
        config = Qwen2_5_VLConfig(**config)
        self.model = Qwen2_5_VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.config = config


def entries_for(folder):
    """MODEL_CONFIGS entries for the diffusers folder `folder`: each file's hash and
    the sizes its class is built with, read from the folder's configs."""
    from diffsynth.core.loader import hash_model_file

    folder = Path(folder)
    t = json.loads((folder / "transformer/config.json").read_text())
    te = json.loads((folder / "text_encoder/config.json").read_text())
    v = json.loads((folder / "vae/config.json").read_text())
    one = lambda sub: str(sorted((folder / sub).glob("*.safetensors"))[0])
    return [
        {
            "model_hash": hash_model_file(one("transformer")),
            "model_name": "qwen_image_dit",
            "model_class": f"{__name__}.TinyQwenImageDiT",
            "extra_kwargs": {
                "num_layers": t["num_layers"], "heads": t["num_attention_heads"],
                "head_dim": t["attention_head_dim"], "text_dim": t["joint_attention_dim"],
                "axes_dim": list(t["axes_dims_rope"]),
            },
        },
        {
            "model_hash": hash_model_file(one("text_encoder")),
            "model_name": "qwen_image_text_encoder",
            "model_class": f"{__name__}.TinyQwenImageTextEncoder",
            "state_dict_converter": "diffsynth.utils.state_dict_converters."
            "qwen_image_text_encoder.QwenImageTextEncoderStateDictConverter",
            "extra_kwargs": {"config": {k: w for k, w in te.items()
                                        if k not in ("architectures", "transformers_version",
                                                     "dtype", "torch_dtype")}},
        },
        {
            "model_hash": hash_model_file(one("vae")),
            "model_name": "qwen_image_vae",
            "model_class": "diffsynth.models.qwen_image_vae.QwenImageVAE",
            "extra_kwargs": {
                "base_dim": v["base_dim"], "z_dim": v["z_dim"], "dim_mult": v["dim_mult"],
                "num_res_blocks": v["num_res_blocks"],
                "temperal_downsample": v["temperal_downsample"],
            },
        },
    ]
