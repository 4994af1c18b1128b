"""Your own network, in your own code: the runner imports ``examples.own_model:build`` (the spec's
``factory``), calls it with the spec's ``kwargs`` and compresses what it returns. Any
``nn.Module`` works, including conv subclasses with their own ``forward``: surgery checks each
replaced layer against the original at the data's input size."""
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


class OwnNet(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(Block(3, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1),
                                      Block(2 * width, 4 * width, 2))
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def build(width: int = 32, num_classes: int = 10) -> nn.Module:
    return OwnNet(width, num_classes)
