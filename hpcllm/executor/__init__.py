"""The one executor every job plugs into (job.py says what a job supplies).

    run.py     set up the world, the job, its model and the plan; the job's phase after the
               shards; agree on the outcome; the master file or the stop note
    loop.py    one tp group claiming, loading and computing shards
    parts.py   a long shard split into parts that several dp groups compute
    follow.py  follow mode: shards of the files that land while the job runs
    inputs.py  a raw corpus or token shards -> ShardData per shard
    job.py     the job interface and the values that cross it: ShardData / Work in,
               ShardResult and Totals out
"""
