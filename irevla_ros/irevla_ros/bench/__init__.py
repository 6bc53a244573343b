"""Collection-loop benchmarks (`make bench`): control timing, transport loss, simulated camera throughput.

Each benchmark starts the real `collect` graph (sim profile) as child processes on a leased ROS domain,
watches it from an observer node in the benchmark process, and writes one JSON file to `bench/results/`.
"""
