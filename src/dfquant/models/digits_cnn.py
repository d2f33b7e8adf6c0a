"""A small BatchNorm CNN for scikit-learn's 8x8 digits: the embedded default model."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..data.digits import DIGITS_PREPROCESSING
from . import register_model


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x3 (16/32/64 channels, one 2x2 max-pool), global average pool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


@register_model("digits_cnn", (1, 8, 8), 10, "digits", preprocessing=DIGITS_PREPROCESSING)
def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes)
