# The demo and test upstream (`rampart-loadtest backend`) FROM scratch.
FROM scratch
COPY rootfs/ /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/rampart-loadtest", "backend"]
CMD ["--listen", "0.0.0.0:8080"]
