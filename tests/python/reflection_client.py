"""A stock grpcio client that knows nothing of biogate's .proto files: it learns the
service from server reflection (grpc.reflection.v1alpha, what grpcio-reflection,
grpcui and older grpcurl builds speak), then enrolls subjects and identifies them.

    python tests/python/reflection_client.py path/to/biogate

Needs grpcio, grpcio-reflection and protobuf (.ci/run installs them in a virtualenv).
Starts `biogate serve` on a free loopback port with a fresh data directory.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

DIM = 512  # the default gallery `biogate serve` makes on first start


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit(seed):
    # A deterministic pseudo-random vector, no numpy needed.
    x = seed * 2654435761 % 2**32
    values = []
    for _ in range(DIM):
        x = (1103515245 * x + 12345) % 2**31
        values.append(x / 2**31 - 0.5)
    norm = sum(v * v for v in values) ** 0.5
    return struct.pack(f"<{DIM}f", *(v / norm for v in values))


def main(biogate):
    data = tempfile.mkdtemp(prefix="biogate-reflection-")
    addr = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [biogate, "serve", "--data-dir", data, "--listen", addr, "--metrics-listen", "off", "--backend", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        channel = grpc.insecure_channel(addr)
        grpc.channel_ready_future(channel).result(timeout=30)
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "biogate.v1.Biogate" in services, services
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("biogate.v1.Biogate")
        methods = {m.name: m for m in service.methods}
        for name in ("Identify", "Enroll"):
            assert name in methods, sorted(methods)

        def message(full_name):
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))

        enroll_request = message(methods["Enroll"].input_type.full_name)
        enroll_response = message(methods["Enroll"].output_type.full_name)
        identify_request = message(methods["Identify"].input_type.full_name)
        identify_response = message(methods["Identify"].output_type.full_name)
        enroll = channel.stream_unary(
            "/biogate.v1.Biogate/Enroll",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=enroll_response.FromString,
        )
        identify = channel.unary_unary(
            "/biogate.v1.Biogate/Identify",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=identify_response.FromString,
        )
        subjects = [f"traveller-{i:02}" for i in range(40)]
        reply = enroll(
            iter(
                enroll_request(gallery="default", subject=s, templates=[unit(i + 1)])
                for i, s in enumerate(subjects)
            )
        )
        assert reply.subjects == len(subjects), reply
        answer = identify(identify_request(gallery="default", probes=[unit(i + 1) for i in range(40)], k=3))
        ranked_first = [r.candidates[0].subject for r in answer.results]
        assert ranked_first == subjects, ranked_first
        print(f"reflection v1alpha: {len(services)} services; enrolled and identified {len(subjects)} subjects at rank 1")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "release", "biogate"))
