"""Small reference architectures, importable as ``--arch growcli.zoo:NAME``.

They are what the bundled fixtures are made of and what the tests grow; each has an
``example_inputs()`` so growcli knows its input shape without ``--input-shape``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, hidden2: int = 24, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden2)
        self.fc3 = nn.Linear(hidden2, d_out)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def example_inputs(self):
        return (torch.randn(2, self.fc1.in_features),)


class SmallCNN(nn.Module):
    """Conv→BN→ReLU→pool, twice, then flatten into a Linear (channel-major flatten)."""

    def __init__(self, channels: int = 8, channels2: int = 12, classes: int = 5, size: int = 16):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels2)
        self.fc = nn.Linear(channels2 * (size // 4) ** 2, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))

    def example_inputs(self):
        return (torch.randn(2, 3, self.size, self.size),)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetTiny(nn.Module):
    """A stem and two stages of basic blocks with identity and projection shortcuts."""

    def __init__(self, width: int = 8, classes: int = 5, size: int = 16):
        super().__init__()
        self.size = size
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def example_inputs(self):
        return (torch.randn(2, 3, self.size, self.size),)


class DenseNetTiny(nn.Module):
    """A DenseNet-style block: every layer's output is concatenated onto its input."""

    def __init__(self, c0: int = 8, growth: int = 4, layers: int = 3, classes: int = 5, size: int = 8):
        super().__init__()
        self.size = size
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.norms = nn.ModuleList()
        self.convs = nn.ModuleList()
        c = c0
        for _ in range(layers):
            self.norms.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, growth, 3, padding=1))
            c += growth
        self.transition = nn.Conv2d(c, c0, 1)
        self.fc = nn.Linear(c0, classes)

    def forward(self, x):
        x = self.stem(x)
        for norm, conv in zip(self.norms, self.convs):
            x = torch.cat([x, conv(F.relu(norm(x)))], dim=1)
        x = F.relu(self.transition(x))
        return self.fc(x.mean(dim=(2, 3)))

    def example_inputs(self):
        return (torch.randn(2, 3, self.size, self.size),)


class MobileNetBlock(nn.Module):
    """Depthwise-separable block: expand 1x1 → depthwise 3x3 → project 1x1, with ReLU6."""

    def __init__(self, c: int = 8, expand: int = 16, classes: int = 5, size: int = 8):
        super().__init__()
        self.size = size
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Conv2d(c, expand, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expand)
        self.depthwise = nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False)
        self.bn2 = nn.BatchNorm2d(expand)
        self.project = nn.Conv2d(expand, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.depthwise(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def example_inputs(self):
        return (torch.randn(2, 3, self.size, self.size),)


class SENet(nn.Module):
    """A conv followed by squeeze-and-excitation: a channel-wise multiply by a gate computed from itself."""

    def __init__(self, c: int = 8, reduced: int = 4, classes: int = 5, size: int = 8):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.se_reduce = nn.Conv2d(c, reduced, 1)
        self.se_expand = nn.Conv2d(reduced, c, 1)
        self.head = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = F.relu(self.head(x * s))
        return self.fc(x.mean(dim=(2, 3)))

    def example_inputs(self):
        return (torch.randn(2, 3, self.size, self.size),)


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A custom (non-Hugging Face) decoder-style model with an ``nn.ModuleList`` of blocks."""

    def __init__(self, vocab: int = 50, d: int = 16, heads: int = 2, layers: int = 2, seq: int = 8):
        super().__init__()
        self.vocab, self.seq = vocab, seq
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def example_inputs(self):
        return (torch.randint(0, self.vocab, (2, self.seq)),)


def mlp(**kw) -> MLP:
    return MLP(**kw)


def cnn(**kw) -> SmallCNN:
    return SmallCNN(**kw)


def resnet(**kw) -> ResNetTiny:
    return ResNetTiny(**kw)
