"""Training and fine-tuning with optax: the CTC loss, the train step, freezing, LoRA, the finetune loop.

from granite_jax import train
loss = train.ctc_loss(model, batch)                      # torch's F.ctc_loss(..., zero_infinity=True)
trainer = train.Trainer(model, train.TrainConfig(learning_rate=1e-4))
metrics = trainer.step(batch, key)                       # jitted, donated: clip, AdamW, schedule, ...
"""

from granite_jax.train.finetune import RunConfig, evaluate, finetune, new_checkpoint
from granite_jax.train.lora import add_lora, merge_lora
from granite_jax.train.loss import ctc_loss, ctc_loss_and_metrics, text_to_labels
from granite_jax.train.step import Remat, TrainConfig, Trainer, make_optimizer, trainable_mask

__all__ = [
    "Remat",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "add_lora",
    "ctc_loss",
    "ctc_loss_and_metrics",
    "evaluate",
    "finetune",
    "make_optimizer",
    "merge_lora",
    "new_checkpoint",
    "text_to_labels",
    "trainable_mask",
]
