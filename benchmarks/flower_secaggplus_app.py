"""Flower's own SecAgg+ client for the baseline: a legacy NumPyClient + ``secaggplus_mod``.

It trains exactly what fedcore's ClientApp trains (fedcore's data partition,
model factory and training loop, one local epoch), so the benchmark compares
the secure-aggregation machinery, not the training.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedcore.clientside.handlers import local_data, run_config
from fedcore.clientside.models import build_model
from fedcore.clientside.training import TrainSettings, make_loader, train
from fedcore.core.seeds import derive_seed


class FedcoreNumPyClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.cfg = run_config(context)
        self.data = local_data(self.cfg, context.node_config)
        self.model = build_model(
            self.cfg.model,
            input_shape=self.data.train.input_shape,
            num_classes=self.data.train.num_classes,
        )
        self.pid = int(context.node_config["partition-id"])

    def get_parameters(self, config):
        return [v.detach().cpu().numpy() for v in self.model.state_dict().values()]

    def fit(self, parameters, config):
        keys = list(self.model.state_dict().keys())
        self.model.load_state_dict(
            {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, parameters, strict=True)}
        )
        seed = derive_seed(self.cfg.run.seed, "train", 0, self.pid)
        settings = TrainSettings.from_config(self.cfg.train, seed=seed)
        loader = make_loader(
            self.data.train, batch_size=settings.batch_size, shuffle=True, seed=seed
        )
        metrics = train(self.model, loader, settings)
        return (
            self.get_parameters({}),
            len(self.data.train),
            {"train_loss": float(metrics["train_loss"])},
        )


def client_fn(context: Context):
    return FedcoreNumPyClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

#: The same client without the mod: Flower's plain rounds (secaggplus_mod needs its config).
plain_app = ClientApp(client_fn=client_fn)
