# Rampart (proxy and controller) FROM scratch: the stripped binary, the libraries it
# links, /etc/passwd with an unprivileged user. Built by deploy/docker/build-images.
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/data /var/lib/rampart
COPY --chown=65532:65532 owned/run /run/rampart
USER 65532:65532
WORKDIR /var/lib/rampart
EXPOSE 8080 8443 9900
# The proxy's admin /healthz (a controller: `rampart healthcheck 127.0.0.1:9901`).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/rampart", "healthcheck", "127.0.0.1:9900"]
ENTRYPOINT ["/usr/local/bin/rampart"]
CMD ["up", "--data-dir", "/var/lib/rampart"]
