"""monarch-megatron: Monarch-matrix BERT/GPT pretraining on megatron-core and DeepSpeed."""

from setuptools import find_packages, setup

HF = ["transformers>=5.24,<6", "safetensors>=0.8"]
PLOT = ["matplotlib"]

setup(
    name="monarch_megatron",
    version="0.1.0",
    description="Monarch-matrix BERT/GPT pretraining with reverse sparsification on megatron-core + DeepSpeed ZeRO-1",
    python_requires=">=3.10",
    packages=find_packages(include=["monarch_megatron", "monarch_megatron.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "deepspeed>=0.19,<0.20",
        "sentencepiece",
        "tensorboard",
        "pyyaml",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # Hugging Face interop (launcher/export_hf.py, launcher/import_hf.py); no torch of its own
        "hf": HF,
        # loss curves (launcher/plot_runs.py, the time-to-quality benchmark's figure)
        "plot": PLOT,
        # triton runs the fused kernel's tests in interpreter mode on CPU; the hf tests need HF,
        # the plot tests PLOT
        "test": ["pytest", "triton", *HF, *PLOT],
    },
)
