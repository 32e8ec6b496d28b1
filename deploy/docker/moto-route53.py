"""moto's Route53 API on 0.0.0.0:5000, with the hosted zones named in MOTO_ZONES
(comma-separated) created at start, so that a Rampart controller finds its zone."""

import os
import signal
import threading

import boto3
from moto.server import ThreadedMotoServer

port = int(os.environ.get("MOTO_PORT", "5000"))
server = ThreadedMotoServer(ip_address="0.0.0.0", port=port)
server.start()
client = boto3.client(
    "route53",
    endpoint_url=f"http://127.0.0.1:{port}",
    region_name="us-east-1",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)
for zone in filter(None, os.environ.get("MOTO_ZONES", "").split(",")):
    client.create_hosted_zone(Name=zone.strip(), CallerReference=f"rampart-{zone}")
    print(f"hosted zone {zone} created", flush=True)
print(f"Route53 on :{port}", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
signal.signal(signal.SIGINT, lambda *_: done.set())
done.wait()
server.stop()
