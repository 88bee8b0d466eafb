"""The one executor every job plugs into (see job.py for what a job supplies).

    run.py     set up the world, the job, its model and the plan; finish
    loop.py    one tp group claiming, loading and computing shards
    parts.py   a long shard split into parts that several dp groups compute
    inputs.py  a raw corpus or token shards -> ShardData per shard
    job.py     the job interface and the data a shard carries
"""
