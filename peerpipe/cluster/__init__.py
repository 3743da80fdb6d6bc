"""The cluster service: device capabilities, benchmarks, membership, heartbeats and plans.

``membership`` is a pure reducer; ``capabilities`` and ``benchmark`` measure the local device;
``links`` measures the network between nodes; ``host_service`` and ``member_service`` run it
all over a room.
"""
