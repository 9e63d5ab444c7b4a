"""The models of docs/gen_cnn_coverage.py: tiny Hugging Face configs, and torchvision's classic CNNs re-implemented.

:data:`HF_MODELS` holds the Hugging Face vision classifiers' tiny configs. The rest of the
module re-implements torchvision's classic CNNs.

torchvision cannot be imported on the development machine (its registry build does not match
the CPU torch), so these follow torchvision's own definitions (``torchvision/models/vgg.py``,
``densenet.py``, ``squeezenet.py``, ``shufflenetv2.py``, ``mobilenetv3.py``) op for op —
the same module structure, in-place activations, ``torch.cat`` concatenations, the channel
shuffle's ``view``/``transpose``/``view``, the squeeze-and-excitation gate with
``hardsigmoid`` and ``hardswish_`` — at toy widths for 32×32 images. They are test models,
not torchvision: weights and names are not interchangeable with torchvision checkpoints.

Each factory takes no argument and returns a model in train mode with seeded random weights.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

NUM_CLASSES = 5
IMAGE = (2, 3, 32, 32)  # the batch shape every model here takes


def vgg() -> nn.Module:
    """torchvision ``vgg11_bn`` shape: conv-BN-ReLU stacks and max pools, an adaptive pool, a 3-layer classifier."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (8, "M", 16, 16, "M", 32, 32, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return _VGG(nn.Sequential(*layers), cin)


class _VGG(nn.Module):
    def __init__(self, features: nn.Module, channels: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(channels * 4, 32), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(32, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class _DenseNet(nn.Module):
    def __init__(self, growth: int = 4, blocks: tuple[int, ...] = (2, 2), init: int = 8, bn_size: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init, kernel_size=3, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        c = init
        for i, n in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet() -> nn.Module:
    """torchvision ``densenet121`` shape: dense blocks (every layer reads the concat of all before it), transitions."""
    return _DenseNet()


class _Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class _SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            _Fire(16, 4, 8, 8), _Fire(16, 4, 8, 8), nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            _Fire(16, 8, 16, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, NUM_CLASSES, kernel_size=1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet() -> nn.Module:
    """torchvision ``squeezenet1_1`` shape: Fire modules (squeeze 1×1, then 1×1 and 3×3 expands concatenated)."""
    return _SqueezeNet()


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, bias=False, groups=cin), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        c2 = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(c2, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, bias=False, groups=half), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class _ShuffleNetV2(nn.Module):
    def __init__(self, repeats: tuple[int, ...] = (2, 2), channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = channels[0]
        for i, (n, cout) in enumerate(zip(repeats, channels[1:])):
            units = [_ShuffleUnit(cin, cout, 2)] + [_ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], NUM_CLASSES)
        self.stages = len(repeats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        for i in range(self.stages):
            x = getattr(self, f"stage{i + 2}")(x)
        return self.fc(self.conv5(x).mean([2, 3]))


def shufflenet() -> nn.Module:
    """torchvision ``shufflenet_v2_x0_5`` shape: channel split (``chunk``), concat, channel shuffle."""
    return _ShuffleNetV2(repeats=(2, 3))


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.Hardswish):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, expanded: int, cout: int, k: int, se: bool, act: type, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv_bn_act(cin, expanded, 1, act=act))
        layers.append(_conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(_SqueezeExcitation(expanded, max(8, expanded // 4)))
        layers.append(_conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class _MobileNetV3(nn.Module):
    # (in, expanded, out, kernel, squeeze-excite, activation, stride), mobilenet_v3_small's pattern at toy widths
    SETTING = ((8, 8, 8, 3, True, nn.ReLU, 2), (8, 24, 16, 3, False, nn.ReLU, 2), (16, 32, 16, 3, False, nn.ReLU, 1),
               (16, 48, 24, 5, True, nn.Hardswish, 2), (24, 64, 24, 5, True, nn.Hardswish, 1),
               (24, 64, 24, 5, True, nn.Hardswish, 1))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 8, 3, 2)]
        layers += [_InvertedResidual(*s) for s in self.SETTING]
        layers.append(_conv_bn_act(24, 64, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(32, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3() -> nn.Module:
    """torchvision ``mobilenet_v3_small`` shape: inverted residuals, squeeze-and-excitation, ``hardswish_``."""
    return _MobileNetV3()


FACTORIES = {"vgg": vgg, "densenet": densenet, "squeezenet": squeezenet, "shufflenet": shufflenet,
             "mobilenet_v3": mobilenet_v3}

# Tiny configs: few channels, two or three stages of two blocks, 32×32 images (64 where the
# family's strides need it). "label": (model_type, config keys, image size).
HF_MODELS = {
    "resnet": ("resnet", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2], layer_type="bottleneck"), 32),
    "resnet-basic": ("resnet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic"), 32),
    "convnext": ("convnext", dict(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2), 32),
    "convnextv2": ("convnextv2", dict(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2), 32),
    "mobilenet_v1": ("mobilenet_v1", dict(depth_multiplier=0.25, min_depth=4), 32),
    "mobilenet_v2": ("mobilenet_v2", dict(depth_multiplier=0.25, min_depth=4, depth_divisible_by=4), 32),
    "efficientnet": ("efficientnet", dict(width_coefficient=1.0, depth_coefficient=1.0, kernel_sizes=[3, 3, 5],
                                          in_channels=[32, 8, 16], out_channels=[8, 16, 16], strides=[1, 2, 1],
                                          num_block_repeats=[1, 2, 2], expand_ratios=[1, 4, 4], hidden_dim=1280,
                                          depthwise_padding=[], num_hidden_layers=5), 32),
    "regnet": ("regnet", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2], groups_width=8), 32),
    "bit": ("bit", dict(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2], num_groups=4), 32),
    "poolformer": ("poolformer", dict(hidden_sizes=[8, 16], depths=[2, 2], num_encoder_blocks=2, patch_sizes=[7, 3],
                                      strides=[4, 2], padding=[2, 1]), 32),
    "mobilevit": ("mobilevit", dict(hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
                                    num_attention_heads=2), 64),
    "mobilevitv2": ("mobilevitv2", dict(width_multiplier=0.25, n_attn_blocks=[1, 1, 1]), 64),
    "levit": ("levit", dict(hidden_sizes=[16, 32, 48], num_attention_heads=[2, 2, 2], depths=[2, 2, 2], key_dim=[4, 4, 4],
                            mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2],
                            down_ops=[["Subsample", 4, 4, 4, 2, 2], ["Subsample", 4, 8, 4, 2, 2]]), 64),
    "swiftformer": ("swiftformer", dict(depths=[2, 2], embed_dims=[8, 16], downsamples=[True, True]), 32),
    "focalnet": ("focalnet", dict(embed_dim=8, hidden_sizes=[16, 32], depths=[2, 2], focal_levels=[2, 2],
                                  focal_windows=[3, 3]), 32),
    "textnet": ("textnet", dict(stem_out_channels=8, hidden_sizes=[8, 8, 16, 16, 32]), 32),
    "hgnet_v2": ("hgnet_v2", dict(embedding_size=8, stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 32],
                                  stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 32, 32, 32],
                                  hidden_sizes=[16, 32, 32, 32], stage_num_blocks=[1, 1, 2, 1],
                                  stage_numb_of_layers=[2, 2, 2, 2]), 32),
}
