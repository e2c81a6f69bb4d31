"""Training: autoencoder, tiny autoencoder, CLIP, UNet, LoRA, embedding and LCM trainers on one shared loop, data sources, losses, EMA.

    from latentdiff.train import VAETrainConfig, UNetTrainConfig, train_vae, train_unet
    train_vae(VAETrainConfig.from_file("vae.toml"))
    train_unet(UNetTrainConfig.from_file("unet.toml"), resume=True)
"""

from __future__ import annotations

from .clip import CLIPTrainConfig, CLIPTrainer, train_clip
from .config import TrainConfig, TrainConfigError, UNetTrainConfig, VAETrainConfig
from .data import EpochOrder, ImageCaptionSource, ImageFolderSource, InMemorySource, TrainDataError, WorldSource
from .ema import EMA
from .embedding import EmbeddingTrainConfig, EmbeddingTrainer, train_embedding
from .lcm import LCMTrainConfig, LCMTrainer, train_lcm
from .loop import TrainResult, TrainTask, run_training
from .lora import LoRATrainConfig, LoRATrainer, train_lora
from .shards import TarShardSource
from .taesd import TAESDTrainConfig, TAESDTrainer, train_taesd
from .unet import UNetTrainer, train_unet
from .vae import VAETrainer, train_vae

__all__ = [
    "CLIPTrainConfig", "CLIPTrainer", "EMA", "EmbeddingTrainConfig", "EmbeddingTrainer", "EpochOrder", "ImageCaptionSource", "ImageFolderSource", "InMemorySource", "LCMTrainConfig",
    "LCMTrainer", "LoRATrainConfig", "LoRATrainer", "TAESDTrainConfig", "TarShardSource", "TAESDTrainer", "TrainConfig",
    "TrainConfigError", "TrainDataError", "TrainResult", "TrainTask", "UNetTrainConfig", "UNetTrainer",
    "VAETrainConfig", "VAETrainer", "WorldSource", "run_training", "train_clip", "train_embedding", "train_lcm", "train_lora", "train_taesd", "train_unet", "train_vae",
]
