# The image deploy/rayjob.yaml and deploy/raycronjob.yaml run: Ray's GPU image (its Ray is the
# manifests' rayVersion), this checkout in /app, installed the way the README installs it, without the
# CPU pin on torch (pip takes the CUDA build the image's driver runs).
#   docker build -t ghcr.io/example/mdlm-factory:0.1.0 .   (the tag: the package version, as the manifests name it)
FROM rayproject/ray:2.60.0-py311-gpu
LABEL org.opencontainers.image.ref.name="ghcr.io/example/mdlm-factory:0.1.0"
WORKDIR /app
COPY --chown=ray:users . /app
RUN pip install --no-cache-dir -e . && factory --help > /dev/null
