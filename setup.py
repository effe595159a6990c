"""exgra-jax: ExGra-Med (multi-graph alignment for medical VLMs) in JAX/Flax.

Version ranges are the ones this project is tested with; see README "Dependencies"
for why some are pinned exactly.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12,<0.13",
    "grain==0.2.18",            # mp_prefetch slicing and the batch_fn shared-memory hook
    "array_record>=0.8",
    "clu==0.0.12",              # metric writers; needs tensorflow-cpu + tensorboard
    "tensorflow-cpu>=2.18",
    "tensorboard>=2.18",
    "ml-collections>=1.0",
    "jraph==0.0.6.dev0",        # only GraphsTuple + segment ops are used (see README)
    "transformers>=5,<6",       # configs, tokenizers, HF layout; torch not needed at run time
    "tokenizers>=0.21",
    "tensorflow-datasets>=4.9",
    "safetensors>=0.4",
    "numpy>=1.26",
    "scipy>=1.11",
    "numba>=0.60",
    "pillow>=10",
    "pydicom>=3.0",
    "nltk>=3.8",
    "absl-py>=2.0",
    "etils[epath]>=1.7",
    "tqdm>=4.60",               # progress bars of the caption-extension tool
    "qwix==0.1.8",              # LoRA / QLoRA adapters and weight-only quantization (models/adapters.py)
]

setup(
    name="exgra_jax",
    version="0.1.0",
    description="ExGra-Med: extended-context multi-graph alignment for medical VLMs, in JAX/Flax",
    packages=find_packages(include=["exgra_jax", "exgra_jax.*"]),
    # the chat page of serve.py; XLA's GPU target descriptions (tools/plan_memory.py --gpu)
    package_data={"exgra_jax.serving": ["static/*.html"],
                  "exgra_jax.train.gpu_targets": ["*.txtpb"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # torch is the reference implementation in parity tests only; 2.13.0 is the
        # CPU build available offline on the project machines. jax[tpu] brings libtpu, the
        # TPU compiler that tests/test_tpu_compile.py runs on the CPU host (no TPU needed);
        # jax[cuda12-local] the CUDA plugin without CUDA's libraries (182 MB of wheels) and
        # nvidia-cudnn-cu12 cuDNN (with cuBLAS, 1.39 GB), the CUDA compiler and the cuDNN
        # attention that tests/test_gpu_compile.py compiles for on the CPU host (no GPU).
        # selenium drives the system's chromium (apt: chromium, chromium-driver; the
        # README's test command installs them) for the chat page's browser test.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "pygmtools>=0.5",
                 "jax[tpu]>=0.10,<0.11", "jax[cuda12-local]>=0.10,<0.11",
                 "nvidia-cudnn-cu12>=9.8,<10", "selenium>=4.20",
                 "peft==0.21.2"],  # peft: the reference for the exported PEFT adapter
    },
)
