"""FGCNN feature generation: convolution, pooling and recombination over the field embedding matrix."""

from __future__ import annotations

import math

import torch
from torch import nn


def pooled_heights(num_fields: int, pooling_sizes: list[int]) -> list[int]:
    """Height of the feature maps after each pooling: ``h_i = ceil(h_{i-1} / p_i)``, ``h_0 = F``.

    The convolutions keep the height ("same" padding); pooling rounds up, so a map shorter than its pooling
    window still yields one row instead of vanishing."""
    heights: list[int] = []
    height = num_fields
    for size in pooling_sizes:
        height = math.ceil(height / size)
        heights.append(height)
    return heights


def generated_fields(num_fields: int, pooling_sizes: list[int], recombined_maps: list[int]) -> int:
    """How many new fields :class:`FeatureGeneration` outputs: Σ_i h_i · m_i."""
    return sum(h * m for h, m in zip(pooled_heights(num_fields, pooling_sizes), recombined_maps, strict=True))


class FeatureGeneration(nn.Module):
    """Generates new field vectors from the embedding matrix ``[B, F, D]`` (Liu et al. 2019, Sec. 3.1).

    Block ``i`` convolves with ``channels[i]`` kernels of shape ``(kernel_heights[i], 1)`` (along the field axis,
    per embedding dimension, height kept with "same" padding), optionally batch-normalises each kernel's map
    (``batch_norm``), applies tanh and max-pools ``(pooling_sizes[i], 1)`` with ceil mode (eq. 1-3). Its pooled
    maps ``[B, C_i, h_i, D]`` feed both the next block and a recombination layer, a fully connected layer + tanh
    that outputs ``recombined_maps[i]`` maps of the same shape ``h_i × D``, i.e. ``h_i · recombined_maps[i]`` new
    fields of width ``D`` (eq. 4). The output is the concatenation of the new fields of every block,
    ``[B, F_new, D]`` with ``F_new = Σ_i h_i · recombined_maps[i]``.

    Batch norm is not in the paper's equations but is what reference implementations (FuxiCTR, used for the BARS
    benchmark) do, and it matters when embeddings are small (strong embedding L2, init std 1e-4): without it the
    convolution outputs, hence the generated fields, are as tiny as the embeddings, and the classifier behaves
    like a linear model for many epochs before interactions emerge.
    """

    def __init__(self, num_fields: int, dim: int, channels: list[int], kernel_heights: list[int],
                 pooling_sizes: list[int], recombined_maps: list[int], batch_norm: bool = True) -> None:
        super().__init__()
        if not (len(channels) == len(kernel_heights) == len(pooling_sizes) == len(recombined_maps)):
            raise ValueError("channels, kernel_heights, pooling_sizes and recombined_maps must have the same length")
        self.dim = dim
        self.convs = nn.ModuleList()
        self.recombinations = nn.ModuleList()
        heights = pooled_heights(num_fields, pooling_sizes)
        in_channels = 1
        for out_channels, kernel, pool, maps, height in zip(channels, kernel_heights, pooling_sizes,
                                                            recombined_maps, heights, strict=True):
            self.convs.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=(kernel, 1), padding="same"),
                *([nn.BatchNorm2d(out_channels)] if batch_norm else []),
                nn.Tanh(),
                nn.MaxPool2d(kernel_size=(pool, 1), ceil_mode=True),
            ))
            self.recombinations.append(nn.Sequential(
                nn.Linear(out_channels * height * dim, maps * height * dim),
                nn.Tanh(),
            ))
            in_channels = out_channels
        self.num_generated = generated_fields(num_fields, pooling_sizes, recombined_maps)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        batch = fields.shape[0]
        maps = fields.unsqueeze(1)  # [B, 1, F, D]
        generated = []
        for conv, recombine in zip(self.convs, self.recombinations, strict=True):
            maps = conv(maps)  # [B, C_i, h_i, D]
            generated.append(recombine(maps.flatten(1)).view(batch, -1, self.dim))
        return torch.cat(generated, dim=1)
