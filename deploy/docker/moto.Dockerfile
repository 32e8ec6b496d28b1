# A Route53 API (moto) for the demo stack and the tests, FROM scratch: a Python runtime
# and the moto venv copied from this machine (scripts/setup makes it).
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/data /var/lib/rampart
COPY --chown=65532:65532 owned/run /run/rampart
ENV PYTHONHOME=/usr/local PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/python3", "/usr/local/share/rampart/moto-route53.py"]
