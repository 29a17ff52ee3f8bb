"""Generated protobuf / gRPC code of the moe_serving.v1 API (protos/moe_serving/v1/*.proto).

Do not edit: regenerate with `python protos/generate_code.py`.
"""
