# Prometheus FROM scratch (Debian's binary), for the Compose stack. The configuration
# is mounted at /etc/prometheus/prometheus.yml.
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/data /var/lib/rampart
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/rampart/prometheus", "--web.listen-address=:9090"]
