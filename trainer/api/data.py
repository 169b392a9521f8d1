"""Dataset, cleaning and preprocessing settings of a DiffusionTrainingJob."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from difftrain.api.base import APIModel, ShortText, Uri, cel, rules, section


class CleaningSpec(APIModel):
    """Which image–text pairs are dropped before training; every drop is counted by reason."""

    min_resolution: int = Field(
        default=256,
        ge=1,
        le=16384,
        description="Drop images whose shorter side is below this many pixels.",
    )
    max_aspect_ratio: float = Field(
        default=3.0,
        ge=1.0,
        le=100.0,
        description="Drop images whose long side divided by the short side exceeds this.",
    )
    drop_exact_duplicates: bool = Field(
        default=True, description="Drop images whose content hash equals an earlier image's."
    )
    near_duplicate_distance: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Drop images whose 64-bit perceptual hash is within this Hamming distance "
        "of an earlier image's. 0 turns near-duplicate removal off.",
    )
    min_caption_words: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Drop pairs whose caption has fewer words (0 keeps empty captions).",
    )
    banned_words: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=1000,
        description="Drop pairs whose caption contains any of these words (case-insensitive, "
        "whole words).",
    )


class CaptionSpec(APIModel):
    """Caption tools: several captions per image, tag shuffling and tag dropout, drawn anew for
    each example every epoch (seeded by hyperparameters.seed, so a resumed run draws the same)."""

    model_config = rules(
        cel(
            "!has(self.keepTokens) || self.keepTokens == 0 || "
            "(has(self.shuffleTags) && self.shuffleTags) || "
            "(has(self.tagDropout) && self.tagDropout > 0.0)",
            "dataset.captions.keepTokens has no effect without shuffleTags or tagDropout; "
            "set one of them or leave keepTokens at 0",
            ".keepTokens",
        )
    )

    lines: Literal["alternatives", "first", "joined"] = Field(
        default="alternatives",
        description="How a caption with several non-empty lines (a caption file's lines, or the "
        "strings of a list in the caption column) is read: 'alternatives' (each line is a caption "
        "of its own and one is drawn each epoch, every one in turn), 'first' (only the first "
        "line), 'joined' (the lines are one caption, joined by spaces).",
    )
    shuffle_tags: bool = Field(
        default=False,
        description="Shuffle the caption's tags (the parts between separators) every epoch, "
        "the first keepTokens of them staying in place.",
    )
    keep_tokens: int = Field(
        default=0,
        ge=0,
        le=255,
        description="How many leading tags stay first and in order, never shuffled or dropped "
        "(e.g. 1 for a trigger word written first in every caption).",
    )
    tag_dropout: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Probability that each tag (beyond the kept ones) is left out of the caption "
        "for an epoch.",
    )
    separator: Annotated[str, Field(min_length=1, max_length=16)] = Field(
        default=",",
        description="What separates tags in a caption. Tags are joined back as written: "
        "'a, b' for ',' (also ';' and ':'), 'a | b' for '|' and other marks.",
    )

    @model_validator(mode="after")
    def _keep_tokens_used(self) -> CaptionSpec:
        if self.keep_tokens and not self.shuffle_tags and self.tag_dropout == 0:
            raise ValueError(
                "dataset.captions.keepTokens has no effect without shuffleTags or tagDropout; "
                "set one of them or leave keepTokens at 0"
            )
        return self


DatasetFormat = Literal["auto", "folder", "jsonl", "webdataset", "classes"]


class DatasetSpec(APIModel):
    """Where the image–text pairs are and how to read and clean them."""

    uri: Uri = Field(
        description="Bucket and prefix (s3://bucket/prefix) or local folder holding the dataset."
    )
    format: DatasetFormat = Field(
        default="auto",
        description="Layout: 'folder' (image + same-stem .txt caption), 'jsonl' "
        "(metadata.jsonl with file_name and a caption column), 'webdataset' (.tar shards), "
        "'classes' (one sub-folder per class, captions from captionTemplate), or 'auto' to "
        "detect it.",
    )
    caption_column: ShortText = Field(
        default="text", description="Caption column of metadata.jsonl (format jsonl)."
    )
    caption_template: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None,
        description="Caption for class-folder datasets (one sub-folder per class, no caption "
        "files), with {class} replaced by the folder name, e.g. 'a photo of a {class}'.",
    )
    cleaning: CleaningSpec = section(CleaningSpec, "What is dropped before training.")
    captions: CaptionSpec = section(
        CaptionSpec, "Several captions per image, tag shuffling and tag dropout."
    )
    limit: int | None = Field(
        default=None, ge=1, description="Use at most this many pairs (after cleaning)."
    )
    repeats: int = Field(
        default=1,
        ge=1,
        le=10000,
        description="How many times each image is seen per epoch (each time with its own "
        "caption draw, flip and latent sample), as kohya's folder repeats. In spec.datasets it "
        "counts towards the epoch's length (images times repeats, summed over the datasets), "
        "while the dataset's share of the epoch is set by its weight.",
    )


MAX_DATASETS = 16


class WeightedDatasetSpec(DatasetSpec):
    """One of several datasets of a job (spec.datasets): a dataset block and its sampling weight."""

    weight: float = Field(
        default=1.0,
        gt=0.0,
        le=1000000.0,
        description="This dataset's share of each epoch: weight / (sum of the weights) of the "
        "epoch's examples, the epoch being as long as the datasets' images times their repeats "
        "summed. A dataset smaller than its share is cycled (reshuffled each pass), a larger one "
        "gives a different part of itself each epoch.",
    )


class BucketSpec(APIModel):
    """Aspect-ratio buckets: each image goes to the nearest bucket, each batch from one bucket."""

    # The has() guards let the section's `{}` default (checked before nested defaults apply) pass.
    model_config = rules(
        cel(
            "!has(self.minSize) || !has(self.maxSize) || self.minSize <= self.maxSize",
            "preprocessing.buckets.minSize must not exceed maxSize",
            ".minSize",
        )
    )

    enabled: bool = Field(default=False, description="Train on aspect-ratio buckets.")
    min_size: int = Field(
        default=256, ge=64, le=4096, multiple_of=8, description="Smallest bucket side, pixels."
    )
    max_size: int = Field(
        default=1024, ge=64, le=4096, multiple_of=8, description="Largest bucket side, pixels."
    )
    step: int = Field(
        default=64, ge=8, le=512, multiple_of=8, description="Bucket side increment, pixels."
    )


class BoomerangSpec(APIModel):
    """Boomerang augmentation: local variants of each image, made by partly noising it and
    denoising it with the base model under its caption."""

    enabled: bool = Field(default=False, description="Add Boomerang variants to the dataset.")
    strength: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="How far each image is noised before denoising (fraction of the schedule); "
        "higher gives variants further from the source.",
    )
    copies: int = Field(default=1, ge=1, le=16, description="Variants made per kept image.")


class PreprocessingSpec(APIModel):
    """How images become training tensors."""

    resolution: int = Field(
        default=512,
        ge=64,
        le=4096,
        multiple_of=8,
        description="Training resolution in pixels (square side; the target area with buckets).",
    )
    crop: Literal["center", "random"] = Field(
        default="center", description="How images are cropped to the resolution."
    )
    flip_probability: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Probability of a horizontal flip. Off by default because it mirrors text "
        "and asymmetric subjects.",
    )
    max_rotation_degrees: float = Field(
        default=0.0,
        ge=0.0,
        le=45.0,
        description="Rotate by a random angle up to this many degrees, cropped so no empty "
        "corners appear.",
    )
    buckets: BucketSpec = section(BucketSpec, "Aspect-ratio bucketing.")
    cache_latents: bool = Field(
        default=True,
        description="Encode images and captions once and keep the VAE latents and text "
        "embeddings in the object store, reused by later runs on the same data and settings.",
    )
    boomerang: BoomerangSpec = section(BoomerangSpec, "Boomerang augmentation.")

    @model_validator(mode="after")
    def _bucket_range(self) -> PreprocessingSpec:
        if self.buckets.min_size > self.buckets.max_size:
            raise ValueError("preprocessing.buckets.minSize must not exceed maxSize")
        return self
