"""Classification: MONAI ResNet-18 backbone, linear head over pooled features,
cross-entropy, accuracy and macro-F1 (MONAI ConfusionMatrixMetric).

Data: the synthetic cross-modality generator (`--data synthetic`) or the MedMNIST
24-class cross-modality set from local .npz files (`--data medmnist --data-root DIR`);
scenarios hard / medium (Dirichlet label skew) and extra (one modality per client).
"""
import torch
import torch.nn.functional as F
from monai.metrics import ConfusionMatrixMetric
from monai.networks.nets import resnet18
from torch.utils.data import TensorDataset

from ..data.federation import medmnist_federation, synthetic_federation
from ..nn import OmniFMAdapter
from .base import ClientData, Plain, Task, set_feature_module

HEAD_PREFIX = "backbone.fc."  # the task head: private under OmniFM, FedPer, FedRep
FUSION_LAYER = "layer3"


class ClassificationTask(Task):
    name = "classification"
    head_prefix = HEAD_PREFIX
    metrics = ("accuracy", "f1")
    main_metric = "accuracy"

    def federation(self):
        cfg = self.cfg
        if cfg.data == "synthetic":
            parts, self.n_classes = synthetic_federation(cfg.clients, cfg.scenario, image_size=cfg.image_size,
                                                         samples_per_client=cfg.synthetic_samples, seed=cfg.seed)
        elif cfg.data == "medmnist":
            if not cfg.data_root:
                raise ValueError("data_root: required with data='medmnist'")
            parts, self.n_classes = medmnist_federation(cfg.data_root, cfg.clients, cfg.scenario, seed=cfg.seed,
                                                        max_per_client=cfg.samples_per_client)
        else:
            raise ValueError(f"data: the classification task reads 'synthetic' or 'medmnist', got {cfg.data!r}")
        return [ClientData(m, TensorDataset(tx, ty), TensorDataset(vx, vy)) for m, tx, ty, vx, vy in parts]

    @property
    def adapter_dim(self):
        return int(256 * self.cfg.width)  # layer3 of ResNet-18 has 256 channels at width 1

    def build_model(self, *, omnifm, adapter_kwargs):
        if not hasattr(self, "n_classes"):
            raise RuntimeError("build_model: call federation() first (it sets the number of classes)")
        kwargs = dict(adapter_kwargs, size=min(8, self.cfg.image_size))
        return build_model(self.n_classes, omnifm=omnifm, width=self.cfg.width, adapter_kwargs=kwargs)

    def loss(self, output, target):
        return loss_fn(output, target)

    def evaluate(self, model, dataset):
        images, labels = dataset.tensors
        acc, f1, _ = evaluate(model, images, labels, self.n_classes)
        return {"accuracy": acc, "f1": f1}

    def prototype_groups(self, targets):
        return targets  # one prototype per class


def build_model(n_classes, *, omnifm=False, width=0.25, in_channels=3, adapter_kwargs=None):
    """ResNet-18 (MONAI, 2-D, a 3x3 stride-1 stem without max-pool for small images),
    widened by `width` (0.25 -> 0.7M parameters), optionally wrapped by OmniFMAdapter
    at layer3. Pooled features land in `model.feature_module.features` (MOON)."""
    backbone = resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=n_classes, widen_factor=width,
                        conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)
    if omnifm:
        dim = int(256 * width)
        model = OmniFMAdapter(backbone, FUSION_LAYER, dim, in_channels, **(adapter_kwargs or {}))
    else:
        model = Plain(backbone)
    # The hook writes onto the module it runs on, so deep copies (MOON) keep their own.
    backbone.avgpool.register_forward_hook(_keep_features)
    set_feature_module(model, backbone.avgpool)
    return model


def _keep_features(module, inputs, output):
    module.features = output.flatten(1)


def loss_fn(logits, labels):
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def evaluate(model, images, labels, n_classes, batch_size=256):
    """(accuracy, macro-F1, loss) of model on one client's held-out split."""
    model.eval()
    logits = torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    pred = logits.argmax(1)
    metric = ConfusionMatrixMetric(metric_name="f1 score", compute_sample=False, reduction="mean_batch")
    metric(F.one_hot(pred, n_classes).float(), F.one_hot(labels, n_classes).float())
    per_class = metric.aggregate()[0]
    # Macro over the classes this client has (as labels or predictions); none is NaN.
    present = torch.bincount(labels, minlength=n_classes) + torch.bincount(pred, minlength=n_classes) > 0
    f1 = torch.nan_to_num(per_class[present]).mean().item()
    return (pred == labels).float().mean().item(), f1, F.cross_entropy(logits, labels).item()
