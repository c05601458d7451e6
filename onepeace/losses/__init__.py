from .contrastive import contrastive_loss, gather_features, temperature
from .denoising import denoising_contrast_loss, label_smoothed_nll

__all__ = ["contrastive_loss", "denoising_contrast_loss", "gather_features", "label_smoothed_nll", "temperature"]
