"""Build omnifm and its compiled extension omnifm_ext._C.

Install with ``pip install --no-build-isolation .`` so the extension is compiled
against the torch already in the environment (build isolation would fetch a second,
multi-GB torch). CUDA kernels are built only with a CUDA torch and nvcc present;
OMNIFM_WITH_CUDA=0/1 forces either way.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def _with_cuda():
    flag = os.environ.get("OMNIFM_WITH_CUDA")
    if flag is not None:
        if flag == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            raise RuntimeError("OMNIFM_WITH_CUDA=1 but torch has no CUDA or nvcc was not found")
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/ops/*.cpp") + rel("csrc/ops/cpu/*.cpp")
    macros = [("OMNIFM_VERSION", f'"{VERSION}"'), ("OMNIFM_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off"]  # no silent FMA: kernels match the reference bit for bit
    cuda_sources = rel("csrc/ops/cuda/*.cu")
    if _with_cuda() and cuda_sources:
        macros.append(("OMNIFM_WITH_CUDA", None))
        return CUDAExtension("omnifm_ext._C", sources + cuda_sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    return CppExtension("omnifm_ext._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx})


setup(
    name="omnifm",
    version=VERSION,
    description="OmniFM: modality- and task-agnostic federated learning for medical imaging, with fused ops",
    packages=find_packages(include=["omnifm", "omnifm.*", "omnifm_ext"]),
    python_requires=">=3.10",
    # medmnist is not listed: it declares torchvision (a multi-GB CUDA build from PyPI)
    # though its dataset code never imports it; install it with --no-deps (README).
    install_requires=["torch>=2.4", "numpy", "monai>=1.3", "tqdm", "matplotlib", "Pillow", "pandas", "scikit-learn"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "hypothesis", "triton>=3.6"],
        "bench": ["triton>=3.6", "faiss-cpu"],
        "tasks": ["nibabel", "torchmetrics", "transformers>=5", "peft>=0.21"],
        "privacy": ["dp-accounting>=0.4"],
        "flower": ["flwr>=1.20"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["omnifm=omnifm.cli:main"]},
    zip_safe=False,
)
