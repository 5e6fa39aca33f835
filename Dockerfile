# monarch-megatron on NVIDIA's PyTorch container (torch, CUDA, NCCL, apex, Transformer Engine,
# triton, nvcc). Only what the image lacks is added; its torch is never replaced.
#
#   docker build -t monarch-megatron .
#   enroot import -o monarch-megatron.sqsh dockerd://monarch-megatron   # for Slurm + pyxis
#
# Written by reading, not built in this project's CI (no Docker daemon there): see README.md.
FROM nvcr.io/nvidia/pytorch:25.10-py3

# The image pins its own packages through PIP_CONSTRAINT (/etc/pip/constraint.txt). We keep that
# pin on purpose: it makes pip fail loudly instead of swapping the image's torch, numpy or
# packaging for other builds. Fused DeepSpeed ops are compiled just in time on first use, for
# A100 (8.0) and H100/H200 (9.0) only; the image's "9.0a"-style entries confuse DeepSpeed's builder.
ENV TORCH_CUDA_ARCH_LIST="8.0 9.0" \
    DS_BUILD_OPS=0 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1

# megatron-core and DeepSpeed without their dependency resolution (both list torch; DeepSpeed's
# setup.py imports torch, hence --no-build-isolation so it sees the image's). Their remaining
# runtime dependencies and ours follow in one plain install: pip skips every one the image
# already satisfies, and the constraint file keeps the versions the image ships.
RUN pip install --no-cache-dir --no-deps megatron-core==0.16.1 \
 && pip install --no-cache-dir --no-deps --no-build-isolation deepspeed==0.19.8 \
 && pip install --no-cache-dir \
        einops hjson msgpack ninja psutil py-cpuinfo "pydantic>=2" tqdm \
        sentencepiece tensorboard pyyaml \
 && python -c "import torch, megatron.core, deepspeed, sentencepiece, tensorboard, yaml; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'deepspeed', deepspeed.__version__)"

WORKDIR /opt/monarch-megatron
COPY . .
# The project itself, editable and without dependencies (all installed above).
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && python -c "import monarch_megatron.monarch as m; print('monarch_megatron ok', m.__name__)"

# `docker run ... monarch-megatron python launcher/pretrain.py --config configs/demo.yaml` works from
# here; under Slurm the scripts in slurm/ start torchrun in this image (CONTAINER_IMAGE=...).
CMD ["bash"]
