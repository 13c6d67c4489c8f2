"""Classification: MONAI ResNet-18 backbone, linear head over pooled features,
cross-entropy, accuracy and macro-F1 (MONAI ConfusionMatrixMetric)."""
import torch
import torch.nn.functional as F
from monai.metrics import ConfusionMatrixMetric
from monai.networks.nets import resnet18
from torch import nn

from ..nn import OmniFMAdapter

HEAD_PREFIX = "backbone.fc."  # the task head: private under OmniFM, FedPer, FedRep
FUSION_LAYER = "layer3"


class Plain(nn.Module):
    """The backbone alone, with the adapter's interface (baselines)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)

    def alignment_loss(self):
        return torch.zeros(())


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
    model.feature_module = backbone.avgpool
    return model


def _keep_features(module, inputs, output):
    module.features = output.flatten(1)


def loss_fn(logits, labels):
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def recalibrate_bn(model, images, batch_size=256):
    """Re-estimate BatchNorm running statistics on `images` (the client's own training
    data) for the weights now loaded: with BN statistics kept local and partial
    participation, a client's stored statistics belong to older weights."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size])
    for m, mom in zip(bns, momenta):
        m.momentum = mom


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
