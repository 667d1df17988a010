"""Training a captioner: `captioner train --config FILE`.

data.py   items (image or cached features, and a caption or an image index), batches, GloVe vectors
steps.py  the two losses: cross-entropy under teacher forcing, and self-critical (scst.py)
scst.py   CIDEr-D rewards and sampling with log-probabilities, for self-critical training
state.py  what resuming needs: counters, optimiser, schedule, random number generators
log.py    metrics.csv, TensorBoard and loss.png
loop.py   `train()`: prepare a run, then epochs of training, validation and checkpoints
"""

from captioner.training.data import epoch_batches, load_glove
from captioner.training.loop import SPLIT_FILE, train
from captioner.training.state import STATE_FILE

__all__ = ["SPLIT_FILE", "STATE_FILE", "epoch_batches", "load_glove", "train"]
