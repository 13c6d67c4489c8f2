"""The Task interface: everything the federation needs to know about a task.

The federation layer (`omnifm.fl`) knows no task: it asks a Task for the clients'
datasets, the model, the loss, the metrics and the groups whose spectral tokens are
averaged into bank prototypes. A task module subclasses `Task` and registers itself
by name in `omnifm.tasks.TASKS`.

Datasets: each client holds a `torch.utils.data.Dataset` for training and one for its
held-out evaluation split; an item is `(input, target)`. In-memory data (the
synthetic generator, MedMNIST) uses `TensorDataset`, which the client batches by
indexing whole tensors (fast); file-backed data (NIfTI, PNG) uses MONAI datasets and
transforms and is read item by item.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class ClientData:
    """One client's data: a name (its modality or institution) and two datasets."""
    name: str
    train: Dataset
    test: Dataset


class Task:
    """Base class of a task plug-in (see module doc).

    Class attributes a task sets:
        name: the `--task` name.
        head_prefix: parameter-name prefix of the task head (private under FedPer,
            FedRep and OmniFM).
        metrics: metric names, in table order (the keys in metrics.jsonl, lowercase).
        main_metric: the one shown in the progress bar and used for "best".
        min_image_size: the smallest image_size its federation() accepts.
    A task may also override `defaults` (settings for the command line).
    """
    name = ""
    head_prefix = ""
    metrics = ()
    main_metric = ""
    min_image_size = 1

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def defaults(cls, scenario=None):
        """Settings this task (and scenario, when given) changes from FLConfig's
        defaults, e.g. its default scenario, image size, or the number of clients a
        scenario fixes (one per institution). The CLI applies them unless given."""
        return {}

    # -- data and model -----------------------------------------------------
    def federation(self):
        """[ClientData] for cfg's data, scenario and number of clients."""
        raise NotImplementedError

    def build_model(self, *, omnifm, adapter_kwargs):
        """The model for this task: the backbone and head, wrapped by OmniFMAdapter
        (at this task's layer and mode) when omnifm is True, else by `Plain`. The
        model exposes `feature_module.features` (pooled features, for MOON)."""
        raise NotImplementedError

    @property
    def adapter_dim(self):
        """Channel width d at the adapter's layer (the spectral token's size)."""
        raise NotImplementedError

    # -- training and evaluation ---------------------------------------------
    def loss(self, output, target):
        raise NotImplementedError

    def evaluate(self, model, dataset):
        """{metric: value} of `model` on one client's held-out dataset."""
        raise NotImplementedError

    def metric_weights(self, dataset):
        """{metric: weight} of one client's values in the federation's mean: by default
        every metric counts the client's held-out samples; a metric over a subset (VQA's
        closed questions) counts that subset, and a client with none of it (weight 0)
        does not enter that metric's mean."""
        return dict.fromkeys(self.metrics, len(dataset))

    def prototype_groups(self, targets):
        """(n,) int64 group of each training sample: the bank receives the mean
        spectral token of each group (classes for classification)."""
        return torch.zeros(len(targets), dtype=torch.int64)


class Plain(nn.Module):
    """The backbone alone, with the adapter's interface (the baselines)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)

    def alignment_loss(self):
        return torch.zeros(())


def set_feature_module(model, module):
    """Point `model.feature_module` (where MOON reads `.features`) at one of its own
    submodules without registering it a second time: a second name would put its
    tensors twice in the state dict, so they would be sent and counted twice."""
    object.__setattr__(model, "feature_module", module)


def keep_pooled_features(module, inputs, output):
    """Forward hook: the spatially pooled features (B, C) of a (B, C, H, W) output land
    in `module.features` (MOON's representation); each deep copy keeps its own."""
    module.features = output.mean((2, 3))
