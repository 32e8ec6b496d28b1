# pebble, Let's Encrypt's test ACME CA (Debian's binary), FROM scratch: the Compose
# stack's certificates come from it. Its API certificate and CA are under /etc/pebble;
# HTTP-01 validations go to port 8080 of the names (the proxies' HTTP listener), looked
# up through the engine's DNS (127.0.0.11), where the proxies answer as www.rampart.test.
FROM scratch
COPY rootfs/ /
USER 65532:65532
# Validate at once instead of pebble's random 0-15 s wait (a demo, not a CA under test).
ENV PEBBLE_VA_NOSLEEP=1
EXPOSE 14000 15000
ENTRYPOINT ["/usr/local/bin/pebble", "-config", "/etc/pebble/pebble.json", "-dnsserver", "127.0.0.11:53"]
