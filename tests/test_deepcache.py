"""DeepCache (cache_interval=N) against the reference implementation's DeepCacheSDHelper on diffusers.

DeepCacheSDHelper(cache_branch_id=0, uniform schedule) wraps diffusers' UNet blocks so that one
step in N runs them all and the others reuse their outputs, computing only conv_in, the last
layer of the last up block and conv_out.  latentdiff's ``cache_interval=N`` must give the same
final latents (1e-5) and images (1/255), for txt2img and img2img.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from test_generate import PROMPTS, SEED, SIZE, compare, generators, with_scheduler

import latentdiff

DeepCache = pytest.importorskip("DeepCache")


@pytest.fixture(scope="module")
def pipe(diffusers_dir: Path) -> latentdiff.Pipeline:
    return latentdiff.load(diffusers_dir)


def with_deepcache(ref, interval: int):
    helper = DeepCache.DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper


@pytest.mark.parametrize(("sampler", "interval"), [("ddim", 3), ("euler_a", 2), ("dpmpp_2m", 4)])
def test_txt2img_with_deepcache_matches_the_reference(pipe, diffusers_dir: Path, sampler: str, interval: int) -> None:
    ref = with_scheduler(diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir), sampler)
    helper = with_deepcache(ref, interval)
    try:
        compare(
            lambda **kw: pipe.txt2img(PROMPTS, steps=8, seed=SEED, sampler=sampler, width=SIZE, height=SIZE,
                                      cache_interval=interval, **kw),
            lambda **kw: ref(PROMPTS, num_inference_steps=8, guidance_scale=7.5, generator=generators(2),
                             width=SIZE, height=SIZE, **kw),
            pipe, ref,
        )
    finally:
        helper.disable()


def test_img2img_with_deepcache_matches_the_reference(pipe, diffusers_dir: Path) -> None:
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    ref = with_scheduler(diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(diffusers_dir), "ddim")
    helper = with_deepcache(ref, 3)
    try:
        compare(
            lambda **kw: pipe.img2img(PROMPTS[1], image, steps=10, strength=0.7, seed=SEED, cache_interval=3, **kw),
            lambda **kw: ref(PROMPTS[1], image=image, num_inference_steps=10, strength=0.7, guidance_scale=7.5,
                             generator=generators(1), **kw),
            pipe, ref,
        )
    finally:
        helper.disable()


def test_deepcache_changes_the_result_and_is_recorded(pipe) -> None:
    """Interval 1 is the plain UNet; interval 3 differs from it (the cache is used) and says so."""
    common = dict(steps=6, seed=1, width=SIZE, height=SIZE)
    plain = pipe.txt2img("a cat", output_type="latent", **common)
    assert torch.equal(plain, pipe.txt2img("a cat", output_type="latent", cache_interval=1, **common))
    assert not torch.allclose(plain, pipe.txt2img("a cat", output_type="latent", cache_interval=3, **common))
    image = pipe.txt2img("a cat", cache_interval=3, **common)[0]
    assert "DeepCache interval: 3" in image.info["parameters"]
    with pytest.raises(latentdiff.BadArgument, match="cache_interval must be an integer"):
        pipe.txt2img("a cat", cache_interval=2.5, **common)
