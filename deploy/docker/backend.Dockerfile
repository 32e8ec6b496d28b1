# The demo and test upstream (`rampart-loadtest backend`) FROM scratch.
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/data /var/lib/rampart
COPY --chown=65532:65532 owned/run /run/rampart
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/rampart-loadtest", "backend"]
CMD ["--listen", "0.0.0.0:8080"]
