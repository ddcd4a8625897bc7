"""The README's LightningCLI YAML config builds the monitor (and a policy from its class_path) and runs."""

import textwrap

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from jepa_monitor.callbacks import JEPAScoreMonitor
from jepa_monitor.export import read_scores
from jepa_monitor.policies import Drop


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        return self.backbone(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader([{"x": torch.randn(6, generator=g)} for _ in range(64)], batch_size=8)


def test_yaml_config_attaches_monitor_and_policy(tmp_path):
    torch.save(torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), tmp_path / "heldout.pt")
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          max_steps: 4
          accelerator: cpu
          enable_progress_bar: false
          enable_checkpointing: false
          logger:
            class_path: lightning.pytorch.loggers.TensorBoardLogger
            init_args: {{save_dir: {tmp_path / "runs"}}}
          callbacks:
            - class_path: jepa_monitor.callbacks.JEPAScoreMonitor
              init_args:
                encoder: backbone
                heldout: {tmp_path / "heldout.pt"}
                input_key: x
                cadence:
                  every_n_batches: 2
                alerts:
                  warn_on: [data_shift, model_change]
                scorer:
                  vectorize: 0
                policy:
                  class_path: jepa_monitor.policies.Drop
                  init_args: {{quantile: 0.05}}
    """))
    cli = LightningCLI(TinyModule, args=["fit", "--config", str(config)], save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, JEPAScoreMonitor)]
    assert isinstance(monitor.policy, Drop) and monitor.policy.quantile == 0.05
    assert monitor.cadence.every_n_batches == 2 and monitor.alerts.warn_on == ("data_shift", "model_change")
    assert monitor.scorer_template.vectorize == 0 and monitor.scorer_template.encoder is None
    assert cli.trainer.global_step == 4
    rows = read_scores(monitor.export_file)
    # fit start + batches 2 and 4 of the held-out set: 3 evaluations of 32 rows
    assert (rows["split"] == "heldout").sum() == 3 * 32
