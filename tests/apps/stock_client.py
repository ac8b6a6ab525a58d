"""A stock Flower ClientApp written the way Flower's quickstart-pytorch writes one.

It imports nothing from fedcore: it only follows Flower's record conventions
("arrays", "config", "metrics", "num-examples"), so it proves that a plain Flower
client can join a fedcore server. Its data: a fixed slice of scikit-learn's digits.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_digits
from torch import nn

app = ClientApp()


class Net(nn.Module):
    """Must match the server's model: fedcore's built-in MLP with hidden=32, depth=1."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _load(partition_id: int, num_partitions: int):
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    return x[partition_id::num_partitions], y[partition_id::num_partitions]


def _net_from(msg: Message) -> nn.Module:
    net = Net()
    # fedcore's MLP is a bare nn.Sequential: its state_dict keys have no "layers." prefix
    state = msg.content["arrays"].to_torch_state_dict()
    net.layers.load_state_dict(state)
    return net


@app.train()
def train(msg: Message, context: Context) -> Message:
    net = _net_from(msg)
    x, y = _load(context.node_config["partition-id"], context.node_config["num-partitions"])
    opt = torch.optim.SGD(net.parameters(), lr=float(msg.content["config"]["lr"]))
    loss = torch.tensor(0.0)
    for i in range(0, len(y), 32):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
        loss.backward()
        opt.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(net.layers.state_dict()),
            "metrics": MetricRecord({"train_loss": float(loss.detach()), "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    net = _net_from(msg)
    x, y = _load(context.node_config["partition-id"], context.node_config["num-partitions"])
    with torch.no_grad():
        out = net(x)
    metrics = MetricRecord(
        {
            "eval_loss": float(nn.functional.cross_entropy(out, y)),
            "eval_acc": float((out.argmax(1) == y).float().mean()),
            "num-examples": len(y),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
