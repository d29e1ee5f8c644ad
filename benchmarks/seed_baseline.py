"""The tutorial's recipe, re-implemented from its text, as the baseline of every benchmark.

This is the seed notebook (``/work/shared/seed/*.txt``) with only what crashes fixed, so
the benchmarks compare the project against what the tutorial really does:

- augmentation: the torchvision ``transforms`` pipeline exactly as written: ``RandomResizedCrop``
  (bicubic) then flip, colour jitter under ``RandomApply`` (default p=0.5: the tutorial
  forgot the paper's 0.8), grayscale, torchvision ``GaussianBlur(kernel_size=5)`` (which
  converts each PIL crop to a tensor, convolves and converts back), ``RandomSolarize(170)``,
  then ``ToTensor`` + ``Normalize`` per crop. All crops at the same ``size``; the only
  addition is an optional ``local_size`` (default: ``size``, i.e. the tutorial) so that the
  benchmark can also compare both pipelines at the paper's 96-pixel local crops.
- model: ``Head`` with the old ``nn.utils.weight_norm`` (deprecated, still works), the
  ``MultiCropWrapper`` that concatenates every crop into one forward pass, the ``Loss`` with
  its double loop, the per-parameter ``clip_gradient``, AdamW on all student parameters,
  the EMA loop of the training script; fp32.
- evaluation: ``compute_knn`` (features of the whole train and val sets, sklearn kNN) with
  the tutorial's plain transform (``ToTensor``, ``Normalize``, ``Resize((224, 224))``).

Fixes (crashes only): ``n_layer`` -> ``n_layers``, ``self.conter_momentum`` ->
``self.center_momentum``, ``.nunmpy()`` -> ``.numpy()``, ``array`` -> ``arrays``,
``beckbone`` -> ``backbone``, ``clip_gradinets`` -> ``clip_gradient``, missing imports,
``vit_deit_small_patch16_224`` (gone from timm) -> the model name the caller passes
(``deit_small_patch16_224`` is the tutorial's; the benchmarks default to ViT-Tiny).
Nothing here is used by the package.
"""

from __future__ import annotations

import warnings

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms
from PIL import Image
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier

# ---------------------------------------------------------------------------- augmentation


class DataAugmentation:
    """The tutorial's multi-crop augmentation (2 global + ``n_local_crops`` local crops)."""

    def __init__(
        self,
        global_crops_scale=(0.4, 1),
        local_crops_scale=(0.05, 0.4),
        n_local_crops=8,
        size=224,
        local_size=None,  # benchmark addition; None = the tutorial (all crops at `size`)
    ):
        self.n_local_crops = n_local_crops
        local_size = size if local_size is None else local_size

        RandomGaussianBlur = lambda p: transforms.RandomApply(  # noqa: E731
            [transforms.GaussianBlur(kernel_size=5, sigma=(0.1, 2))], p=p
        )

        flip_and_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)]
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )

        normalize = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

        self.global_1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    size, scale=global_crops_scale, interpolation=Image.BICUBIC
                ),
                flip_and_jitter,
                RandomGaussianBlur(1.0),  # Always apply
                normalize,
            ]
        )

        self.global_2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    size, scale=global_crops_scale, interpolation=Image.BICUBIC
                ),
                flip_and_jitter,
                RandomGaussianBlur(0.1),
                transforms.RandomSolarize(170, p=0.2),
                normalize,
            ]
        )

        self.local = transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    local_size, scale=local_crops_scale, interpolation=Image.BICUBIC
                ),
                flip_and_jitter,
                RandomGaussianBlur(0.5),
                normalize,
            ]
        )

    def __call__(self, img):
        all_crops = []
        all_crops.append(self.global_1(img))
        all_crops.append(self.global_2(img))
        all_crops.extend([self.local(img) for _ in range(self.n_local_crops)])
        return all_crops


def pil_loader(path):
    """``torchvision.datasets.ImageFolder``'s default loader: open the file, convert to RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def plain_transform():
    """The tutorial's evaluation transform (normalise, then resize the tensor to 224x224)."""
    return transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            transforms.Resize((224, 224)),
        ]
    )


# ---------------------------------------------------------------------------- model


class Head(nn.Module):
    """The tutorial's head: MLP, L2 normalisation, old-API weight-normalised last layer."""

    def __init__(
        self, in_dim, out_dim, hidden_dim=512, bottleneck_dim=256, n_layers=3, norm_last_layer=False
    ):
        super().__init__()
        if n_layers == 1:  # fixed: the tutorial tested the undefined `n_layer`
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            layers.append(nn.GELU())
            for _ in range(n_layers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)

        self.apply(self._init_weights)
        with warnings.catch_warnings():  # the deprecated API the tutorial uses, on purpose
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)  # (n_samples, bottleneck_dim)
        x = nn.functional.normalize(x, dim=-1, p=2)  # (n_samples, bottleneck_dim)
        x = self.last_layer(x)  # (n_samples, out_dim)
        return x


class MultiCropWrapper(nn.Module):
    """The tutorial's wrapper: all crops concatenated into one forward pass."""

    def __init__(self, backbone, new_head):
        super().__init__()
        backbone.head = nn.Identity()  # Deactivate original head
        self.backbone = backbone
        self.new_head = new_head

    def forward(self, x):
        n_crops = len(x)
        concatenated = torch.cat(x, dim=0)  # (n_samples * n_crops, 3, size, size)
        cls_embedding = self.backbone(concatenated)  # (n_samples * n_crops, in_dim)
        logits = self.new_head(cls_embedding)  # (n_samples * n_crops, out_dim)
        chunks = logits.chunk(n_crops)  # n_crops * (n_samples, out_dim)
        return chunks


class Loss(nn.Module):
    """The tutorial's loss (double loop over teacher/student views, EMA center)."""

    def __init__(self, out_dim, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_temp = [s / self.student_temp for s in student_output]
        teacher_temp = [(t - self.center) / self.teacher_temp for t in teacher_output]

        student_sm = [F.log_softmax(s, dim=-1) for s in student_temp]
        teacher_sm = [F.softmax(t, dim=-1).detach() for t in teacher_temp]

        total_loss = 0
        n_loss_terms = 0
        for t_ix, t in enumerate(teacher_sm):
            for s_ix, s in enumerate(student_sm):
                if t_ix == s_ix:
                    continue
                loss = torch.sum(-t * s, dim=-1)  # (n_samples,)
                total_loss += loss.mean()  # Scalar
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.cat(teacher_output).mean(dim=0, keepdim=True)  # (1, out_dim)
        # fixed: the tutorial read `self.conter_momentum`
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def clip_gradient(model, clip=2.0):
    """The tutorial's per-parameter gradient clipping (one host sync per tensor)."""
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm()
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def build(
    model_name, out_dim=1024, device="cpu", weight_decay=0.4, batch_size=32, norm_last_layer=False
):
    """The tutorial's ``main()`` set-up: student, teacher, loss and AdamW.

    Returns:
        ``(student, teacher, loss_inst, optimizer)``.
    """
    student_vit = timm.create_model(model_name, pretrained=False)
    teacher_vit = timm.create_model(model_name, pretrained=False)
    dim = student_vit.num_features
    student = MultiCropWrapper(student_vit, Head(dim, out_dim, norm_last_layer=norm_last_layer))
    teacher = MultiCropWrapper(teacher_vit, Head(dim, out_dim))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_inst = Loss(out_dim).to(device)
    lr = 0.0005 * batch_size / 256
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    return student, teacher, loss_inst, optimizer


def train_step(
    student,
    teacher,
    loss_inst,
    optimizer,
    images,
    device="cpu",
    clip_grad=2.0,
    momentum_teacher=0.9995,
):
    """One iteration of the tutorial's training loop (without the periodic evaluation)."""
    images = [img.to(device) for img in images]

    teacher_output = teacher(images[:2])
    student_output = student(images)

    loss = loss_inst(student_output, teacher_output)
    optimizer.zero_grad()
    loss.backward()
    clip_gradient(student, clip_grad)
    optimizer.step()

    with torch.no_grad():
        for student_ps, teacher_ps in zip(student.parameters(), teacher.parameters(), strict=True):
            teacher_ps.data.mul_(momentum_teacher)
            teacher_ps.data.add_((1 - momentum_teacher) * (student_ps.detach().data))
    return loss


# ---------------------------------------------------------------------------- evaluation


def compute_knn(backbone, data_loader_train, data_loader_val):
    """The tutorial's kNN: every train and val embedding, then sklearn's classifier."""
    device = next(backbone.parameters()).device
    data_loaders = {"train": data_loader_train, "val": data_loader_val}
    lists = {"X_train": [], "y_train": [], "X_val": [], "y_val": []}
    for name, data_loader in data_loaders.items():
        for imgs, y in data_loader:
            imgs = imgs.to(device)
            lists[f"X_{name}"].append(backbone(imgs).detach().cpu().numpy())
            lists[f"y_{name}"].append(y.detach().cpu().numpy())

    arrays = {k: np.concatenate(v) for k, v in lists.items()}
    estimator = KNeighborsClassifier()
    estimator.fit(arrays["X_train"], arrays["y_train"])
    y_val_pred = estimator.predict(arrays["X_val"])
    return accuracy_score(arrays["y_val"], y_val_pred)
