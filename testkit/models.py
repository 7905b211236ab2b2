"""Small models with every symmetry the specs know (MLP, CNN, ResNet with BatchNorm or LayerNorm, transformers
with and without rotary embeddings, nn.MultiheadAttention): shared by the symmetry, rebasin and metanet tests
and by bench/metanets.py."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (8, 16, 16, 4)) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """VGG-style: conv+BN blocks, pooling, flatten of C×H×W, dense classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def batch_norm(c: int) -> nn.Module:
    return nn.BatchNorm2d(c)


def layer_norm(c: int) -> nn.Module:
    """LayerNorm over (C, H, W) with a per-channel affine: GroupNorm with one group."""
    return nn.GroupNorm(1, c)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm=batch_norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(o)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with BatchNorm (3 stages, projection shortcuts where channels change)."""

    def __init__(self, w: int = 8, n: int = 2, classes: int = 10, norm=batch_norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = norm(w)
        self.layer1 = nn.Sequential(*[Block(w, w, 1, norm) for _ in range(n)])
        self.layer2 = nn.Sequential(
            Block(w, 2 * w, 2, norm), *[Block(2 * w, 2 * w, 1, norm) for _ in range(n - 1)]
        )
        self.layer3 = nn.Sequential(
            Block(2 * w, 4 * w, 2, norm), *[Block(4 * w, 4 * w, 1, norm) for _ in range(n - 1)]
        )
        self.linear = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.layer3(self.layer2(self.layer1(o)))
        return self.linear(F.adaptive_avg_pool2d(o, 1).flatten(1))


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on (B, H, T, d): rotate feature pairs (i, i + d/2) by position."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(t).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attn(nn.Module):
    def __init__(self, d: int, h: int, use_rope: bool = False) -> None:
        super().__init__()
        self.h, self.use_rope = h, use_rope
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.h, d // self.h).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, d // self.h).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, d // self.h).transpose(1, 2)
        if self.use_rope:
            q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.h), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class TBlock(nn.Module):
    def __init__(self, d: int, h: int, f: int, use_rope: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attn(d, h, use_rope)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Pre-LN decoder-style transformer: token + learned position embedding, 4 heads, untied head."""

    def __init__(
        self,
        vocab: int = 50,
        d: int = 16,
        h: int = 4,
        f: int = 32,
        n: int = 2,
        t: int = 12,
        use_rope: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos_emb = nn.Parameter(torch.randn(t, d) * 0.1)
        self.blocks = nn.ModuleList([TBlock(d, h, f, use_rope) for _ in range(n)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos_emb[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class MHANet(nn.Module):
    """torch's fused nn.MultiheadAttention inside a residual block, mean-pooled head."""

    def __init__(self, d: int = 16, h: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.fc1, self.fc2, self.out = nn.Linear(d, 24), nn.Linear(24, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.out(x.mean(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BN layers are identities per channel)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def zoo() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "mlp": (MLP(), torch.randn(5, 8)),
        "cnn": (randomize_bn(CNN()), torch.randn(2, 3, 8, 8)),
        "resnet": (randomize_bn(ResNet()), torch.randn(2, 3, 16, 16)),
        "transformer": (Transformer(), torch.randint(0, 50, (2, 12))),
    }


# ---------------------------------------------------------------------------------------------
# spec construction and validation
# ---------------------------------------------------------------------------------------------
