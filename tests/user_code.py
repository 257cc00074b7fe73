"""A user's own code, as tests write it into a folder on sys.path: models, data factories, a loss.

The tests copy this file into ``tmp_path`` under the module name they import (so that the code
dnsconvert imports is outside the dnsconvert package, as a user's would be).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset


class TwoInputNet(nn.Module):
    """Float features and integer token ids in (positionally), a dict of two outputs out."""

    def __init__(self, features: int = 12, vocab: int = 20, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.body = nn.Linear(features + 8, 64)
        self.head = nn.Linear(64, classes)
        self.aux = nn.Linear(64, 1)

    def forward(self, features, tokens):
        h = torch.relu(self.body(torch.cat([features, self.embed(tokens).mean(1)], dim=1)))
        return {"logits": self.head(h), "score": self.aux(h).squeeze(-1)}


def two_input_net(**kwargs):
    return TwoInputNet(**kwargs)


class Pairs(Dataset):
    """Examples as dicts: features, tokens and a label learnable from both."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, 12, generator=g)
        self.tokens = torch.randint(0, 20, (n, 5), generator=g)
        self.labels = (self.features[:, 0] > 0).long() + (self.tokens.float().mean(1) > 9.5).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"features": self.features[i], "tokens": self.tokens[i], "labels": self.labels[i]}


def pair_data(n_train: int = 1024, n_test: int = 256):
    """A DataLoader for training (its batch size and shuffle are the user's; dnsconvert draws its own) and a Dataset for testing."""
    return DataLoader(Pairs(n_train, 0), batch_size=32, shuffle=True), Pairs(n_test, 1)


class RGBNet(nn.Module):
    """A 3-channel CNN (what --data synthetic used to feed 1x28x28 digits)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


def rgb_net():
    return RGBNet()


RGB_MEAN, RGB_STD = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)


class Colours(Dataset):
    """(image, label) tuples, normalised by the data itself with its own per-channel statistics."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        raw = torch.rand(n, 3, 16, 16, generator=g) * 0.5
        raw[:, 0] += 0.5 * (self.labels % 2).view(-1, 1, 1)  # red half: odd labels
        raw[:, 1] += 0.5 * (self.labels // 2).view(-1, 1, 1)  # green half: labels 2, 3
        mean, std = torch.tensor(RGB_MEAN).view(3, 1, 1), torch.tensor(RGB_STD).view(3, 1, 1)
        self.images = (raw - mean) / std

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def colour_data(n_train: int = 256, n_test: int = 64):
    return {"train": Colours(n_train, 0), "test": Colours(n_test, 1)}


def smooth_ce(output, target):
    """A user loss: label-smoothed cross-entropy."""
    return F.cross_entropy(output, target, label_smoothing=0.1)


class Stream(IterableDataset):
    def __iter__(self):
        yield from (torch.zeros(3, 16, 16) for _ in range(4))


def stream_data():
    return Stream(), Stream()


def extra_key_data():
    class Extra(Pairs):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "weights": torch.ones(())}

    return Extra(64, 0), Extra(16, 1)


def bad_loss(output, target):
    return output  # not a scalar


class TinyLM(nn.Module):
    """A causal LM of one embedding and a Linear head; takes input_ids (and ignores a mask)."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + torch.cumsum(torch.relu(self.mix(h)), dim=1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return {"logits": self.head(h)}


def tiny_lm(vocab: int = 16):
    return TinyLM(vocab)


class Counting(Dataset):
    """Token sequences that count up by one, wrapping at 16: the next token is learnable."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 16, (n, 1), generator=g)
        self.ids = (start + torch.arange(12)) % 16

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.int64)}


def counting_data():
    return Counting(512, 0), Counting(64, 1)
