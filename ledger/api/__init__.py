"""The gRPC API (package custody.v1): servicers, interceptors, server, client, dev certificates.

Importing the package makes sure the generated protobuf/gRPC modules under `ledger/api/gen/`
exist and match `protos/` (see `ledger.api.codegen`); they are built, never committed.
"""

from ledger.api.codegen import ensure_generated

ensure_generated()
