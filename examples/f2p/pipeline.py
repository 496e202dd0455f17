"""Qwen-Image-Edit-F2P as a hotpipe Python pipeline: a tight face crop in, a full-body
photo of that person out, one per face, with each photo's own prompt, negative prompt,
seed and step count (hotpipe's [params]).

Written against DiffSynth-Studio's published API (`diffsynth.pipelines.qwen_image`,
as in its examples/qwen_image/model_inference scripts and the F2P model card). It has
NOT been run by hotpipe's developers: the weights (about 60 GB) cannot be downloaded
on their machines. See README.md for what was run instead.
"""

import numpy as np
import torch
from PIL import Image


class F2P:
    # hotpipe hands __call__ numpy arrays (the default); DiffSynth wants PIL images.
    inputs = "numpy"

    def __init__(self, device, options):
        from diffsynth.pipelines.qwen_image import ModelConfig, QwenImagePipeline

        self.height = int(options.get("height", 1152))
        self.width = int(options.get("width", 864))
        models = options.get("models")  # a local folder with the weights, if not the hub
        def cfg(model_id, pattern):
            if models:
                return ModelConfig(path=f"{models}/{model_id}/{pattern}")
            return ModelConfig(model_id=model_id, origin_file_pattern=pattern)
        self.pipe = QwenImagePipeline.from_pretrained(
            torch_dtype=torch.bfloat16,
            device=device,
            model_configs=[
                cfg("Qwen/Qwen-Image-Edit", "transformer/diffusion_pytorch_model*.safetensors"),
                cfg("Qwen/Qwen-Image", "text_encoder/model*.safetensors"),
                cfg("Qwen/Qwen-Image", "vae/diffusion_pytorch_model.safetensors"),
            ],
            tokenizer_config=None,
            processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/"),
        )
        self.pipe.load_lora(self.pipe.dit, options["lora"])

    def output_shape(self, height, width, channels):
        return (1, self.height, self.width, 3)

    def __call__(self, images, params):
        out = []
        # One face at a time: a 20B transformer at 1152 x 864 fills a GPU with one image.
        for face, p in zip(images, params):
            image = self.pipe(
                p["prompt"],
                negative_prompt=p.get("negative_prompt", ""),
                edit_image=Image.fromarray(np.ascontiguousarray(face[:, :, :3])),
                seed=int(p["seed"]),
                num_inference_steps=int(p["steps"]),
                height=self.height,
                width=self.width,
            )
            out.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        return np.stack(out)
