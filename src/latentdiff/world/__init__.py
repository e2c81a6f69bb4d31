"""Shapes World: the built-in procedurally generated captioned image world.

The world is specified in ``shapes-world.md`` (kept in sync with
:mod:`latentdiff.world.spec`). Typical use::

    from latentdiff import world
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng)
    image = world.render(scene)                      # (64, 64, 3) uint8
    text = world.caption(scene)                      # "a large red circle ... on a white background"
    world.judge(image, text).correct                 # True
    world.hard_negatives(world.parse_caption(text), scene, 4, rng)  # 4 captions, one attribute off
    data = world.WorldDataset(seed=0, length=100_000, as_tensor=True)
    prompts = world.held_out_prompts()               # 400 captions training never shows
"""

from .captions import (
    CaptionSpec,
    ObjectSpec,
    caption,
    caption_spec,
    parse_caption,
    sample_caption,
    sample_caption_spec,
    sample_scene,
    scene_from_caption,
)
from .dataset import (
    WorldDataset,
    WorldSample,
    collate,
    held_out_prompts,
    image_to_tensor,
    is_held_out,
    sample_training_scene,
    tensor_to_image,
    zero_shot_candidates,
)
from .judge import (
    ATTRIBUTES,
    DetectedObject,
    Judgement,
    Reading,
    accuracy_report,
    judge,
    read_image,
    read_objects,
)
from .negatives import (
    ATTRIBUTE_KINDS,
    MIN_VARIANTS,
    attribute_difference,
    describes,
    hard_negatives,
    one_attribute_variants,
    world_words,
)
from .render import render, shape_mask
from .spec import (
    BACKGROUND_COLOURS,
    CANVAS,
    CELL_PHRASES,
    CELLS,
    OBJECT_COLOURS,
    PALETTE,
    SHAPES,
    SIZES,
    Scene,
    WorldObject,
)

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_KINDS",
    "BACKGROUND_COLOURS",
    "CANVAS",
    "CELLS",
    "CELL_PHRASES",
    "CaptionSpec",
    "DetectedObject",
    "Judgement",
    "MIN_VARIANTS",
    "OBJECT_COLOURS",
    "ObjectSpec",
    "PALETTE",
    "Reading",
    "SHAPES",
    "SIZES",
    "Scene",
    "WorldDataset",
    "WorldObject",
    "WorldSample",
    "accuracy_report",
    "attribute_difference",
    "caption",
    "caption_spec",
    "collate",
    "describes",
    "hard_negatives",
    "held_out_prompts",
    "image_to_tensor",
    "is_held_out",
    "judge",
    "one_attribute_variants",
    "parse_caption",
    "read_image",
    "read_objects",
    "render",
    "sample_caption",
    "sample_caption_spec",
    "sample_scene",
    "sample_training_scene",
    "scene_from_caption",
    "shape_mask",
    "tensor_to_image",
    "world_words",
    "zero_shot_candidates",
]
