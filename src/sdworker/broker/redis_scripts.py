"""Lua scripts of the Redis broker: every state change and its event in one atomic step.

Keys are built inside the scripts from a prefix (ARGV[1]), so the broker needs a
non-cluster Redis (or one hash slot); every managed single-node Redis qualifies.
"""

# Shared helpers, prepended to each script.
_COMMON = """
local p = ARGV[1]
local function emit(id, kind, data, now)
  local eid = redis.call('INCR', p .. ':seq:event')
  redis.call('XADD', p .. ':events:' .. id, '*', 'id', eid, 'type', kind, 'data', data,
    'created_at', now)
end
local function queued_score(rank, seq)
  return (3 - tonumber(rank)) * 1e13 + tonumber(seq)
end
local function entry_stream(job)
  -- the stream the job's entry lives in: its priority stream ('stream'), or the one it
  -- was moved to by an affinity claim ('entry_stream', absent on older records)
  local name = redis.call('HGET', job, 'entry_stream') or redis.call('HGET', job, 'stream')
  return p .. ':stream:' .. name
end
local function finish(id, job, status, now, ttl)
  redis.call('HSET', job, 'status', status, 'finished_at', now)
  redis.call('SREM', p .. ':running', id)
  redis.call('ZREM', p .. ':queued', id)
  redis.call('HINCRBY', p .. ':stats:finished', status, 1)
  local entry = redis.call('HGET', job, 'entry')
  if entry then
    local stream = entry_stream(job)
    redis.call('XACK', stream, 'workers', entry)
    redis.call('XDEL', stream, entry)
  end
  if tonumber(ttl) > 0 then
    redis.call('EXPIRE', job, ttl)
    redis.call('EXPIRE', p .. ':events:' .. id, ttl)
    local key = redis.call('HGET', job, 'idempotency_key')
    if key then redis.call('EXPIRE', p .. ':idem:' .. key, ttl) end
  end
end
local function fail_job(id, job, code, message, now, ttl)
  redis.call('HSET', job, 'error_code', code, 'error_message', message)
  redis.call('HINCRBY', p .. ':stats:errors', code, 1)
  finish(id, job, 'failed', now, ttl)
  emit(id, 'failed', cjson.encode({code = code, message = message}), now)
end
local function cancel_job(id, job, during, now, ttl)
  finish(id, job, 'canceled', now, ttl)
  emit(id, 'canceled', cjson.encode({['while'] = during}), now)
end
local function requeue(id, job, reason, now)
  local entry = redis.call('HGET', job, 'entry')
  if entry then
    local current = entry_stream(job)
    redis.call('XACK', current, 'workers', entry)
    redis.call('XDEL', current, entry)
  end
  redis.call('HSET', job, 'status', 'queued', 'step', 0, 'total_steps', 0)
  redis.call('HDEL', job, 'worker_id', 'heartbeat_at', 'entry_stream')
  redis.call('SREM', p .. ':running', id)
  -- always back into its priority stream, whichever stream it was delivered through;
  -- the new entry's id is its new queued time (the affinity wait starts again)
  local stream = redis.call('HGET', job, 'stream')
  local new_entry = redis.call('XADD', p .. ':stream:' .. stream, '*', 'job', id)
  redis.call('HSET', job, 'entry', new_entry)
  -- back of its priority, like its new stream entry, so queue_position tells the truth
  local order = redis.call('INCR', p .. ':seq:job')
  redis.call('ZADD', p .. ':queued', queued_score(redis.call('HGET', job, 'priority'), order), id)
  emit(id, 'queued', cjson.encode({reason = reason}), now)
end
local function held(job, worker)
  return redis.call('HGET', job, 'status') == 'running'
    and redis.call('HGET', job, 'worker_id') == worker
end
"""

# ARGV: prefix, id, spec, spec_hash, idempotency key or '', rank, priority, owner, now,
# batch key, number of images, model key
ENQUEUE = (
    _COMMON
    + """
local id, key = ARGV[2], ARGV[5]
if key ~= '' then
  local earlier = redis.call('GET', p .. ':idem:' .. key)
  if earlier and redis.call('EXISTS', p .. ':job:' .. earlier) == 1 then
    if redis.call('HGET', p .. ':job:' .. earlier, 'spec_hash') == ARGV[4] then
      return {earlier, 0}
    end
    return {earlier, -1}
  end
end
local seq = redis.call('INCR', p .. ':seq:job')
local job = p .. ':job:' .. id
redis.call('HSET', job, 'id', id, 'status', 'queued', 'priority', ARGV[6], 'owner', ARGV[8],
  'spec', ARGV[3], 'spec_hash', ARGV[4], 'attempts', 0, 'step', 0, 'total_steps', 0,
  'cancel_requested', 0, 'created_at', ARGV[9], 'seq', seq, 'stream', ARGV[7],
  'batch_key', ARGV[10], 'num_images', ARGV[11], 'model', ARGV[12])
if key ~= '' then
  redis.call('SET', p .. ':idem:' .. key, id)
  redis.call('HSET', job, 'idempotency_key', key)
end
redis.call('ZADD', p .. ':queued', queued_score(ARGV[6], seq), id)
redis.call('ZADD', p .. ':jobs', seq, id)
redis.call('ZADD', p .. ':owner:' .. ARGV[8], seq, id)
local entry = redis.call('XADD', p .. ':stream:' .. ARGV[7], '*', 'job', id)
redis.call('HSET', job, 'entry', entry)
emit(id, 'queued', cjson.encode({priority = ARGV[7]}), ARGV[9])
return {id, 1}
"""
)

# ARGV: prefix, worker, now, batch key ('' = any job), max images (-1 = any), preferred
# model keys (a JSON list; [] = no preference), affinity wait (ms), affinity scan (entries
# behind the head), affinity stream name, stream names in priority order...
#
# A job is queued as an undelivered entry of its priority stream. The head of a stream
# is its next undelivered entry (XREADGROUP '>' hands it out, and it stays pending until
# the job ends). A job taken from behind the head cannot be handed out by XREADGROUP
# without the entries before it, so its entry is deleted and the job re-added to the
# affinity stream and read from there at once: it is pending for this worker like any
# claimed entry (heartbeats XCLAIM it, reclaim's XAUTOCLAIM finds it), and the job
# hash says where ('entry_stream'); 'stream' keeps its priority, where requeue puts it.
# The time a job has waited is read from its entry id (server milliseconds at XADD,
# enqueue or requeue) against the server's clock: no client clocks are compared.
CLAIM = (
    _COMMON
    + """
local worker, now, batch_key, max_images = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local preferred, prefer = {}, false
for _, model in ipairs(cjson.decode(ARGV[6])) do
  preferred[model] = true
  prefer = true
end
local wait_ms, scan, affinity = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local function take(stream)
  local reply = redis.call('XREADGROUP', 'GROUP', 'workers', worker, 'COUNT', 1,
    'STREAMS', stream, '>')
  if not reply then return nil end
  return reply[1][2][1]
end
local function live(entry)
  local job = p .. ':job:' .. entry[2][2]
  return redis.call('HGET', job, 'status') == 'queued'
    and redis.call('HGET', job, 'entry') == entry[1]
end
local function drop(stream, entry)
  -- a canceled or superseded entry: acknowledge it and look further
  redis.call('XACK', stream, 'workers', entry[1])
  redis.call('XDEL', stream, entry[1])
end
local function start(entry, moved_to)
  local id = entry[2][2]
  local job = p .. ':job:' .. id
  if moved_to then
    redis.call('HSET', job, 'entry', entry[1], 'entry_stream', moved_to)
  else
    redis.call('HDEL', job, 'entry_stream')  -- delivered from its priority stream
  end
  local attempts = redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HSET', job, 'status', 'running', 'worker_id', worker, 'started_at', now,
    'heartbeat_at', now, 'step', 0, 'total_steps', 0)
  redis.call('ZREM', p .. ':queued', id)
  redis.call('SADD', p .. ':running', id)
  emit(id, 'started', cjson.encode({worker_id = worker, attempt = attempts}), now)
  return id
end
local function next_undelivered(stream)
  -- the entry XREADGROUP '>' would hand out next, without handing it out
  local last = '0-0'
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == 'workers' then last = fields['last-delivered-id'] end
  end
  local entries = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
  return entries[1]
end
local function model_of(entry)
  -- records from before model affinity have no model: the default model's key
  return redis.call('HGET', p .. ':job:' .. entry[2][2], 'model') or ''
end
local function waited_ms(entry)
  local clock = redis.call('TIME')
  local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  return now_ms - tonumber(string.match(entry[1], '^%d+'))
end
local function preferred_behind(stream, head)
  -- the oldest live entry for a preferred model among the `scan` entries behind the head
  for _, entry in ipairs(redis.call('XRANGE', stream, '(' .. head[1], '+', 'COUNT', scan)) do
    if live(entry) and preferred[model_of(entry)] then return entry end
  end
  return nil
end
local function start_moved(stream, entry)
  local id = entry[2][2]
  redis.call('XDEL', stream, entry[1])  -- undelivered: nothing to acknowledge
  local target = p .. ':stream:' .. affinity
  local moved = redis.call('XADD', target, '*', 'job', id)
  while true do
    local got = take(target)
    if not got then return redis.error_reply('affinity entry ' .. moved .. ' not read') end
    if got[1] == moved then break end
    drop(target, got)  -- left by a script that failed halfway: no job points at it
  end
  return start({moved, {'job', id}}, affinity)
end
local function claim_batch(stream)
  -- a batch takes only the head of the queue, and only a job that fits it
  while true do
    local entry = next_undelivered(stream)
    if not entry then return nil end
    if live(entry) then
      local job = p .. ':job:' .. entry[2][2]
      if redis.call('HGET', job, 'batch_key') ~= batch_key then return false end
      if max_images >= 0 and tonumber(redis.call('HGET', job, 'num_images') or '1')
          > max_images then return false end
      return start(take(stream))
    end
    drop(stream, take(stream))
  end
end
local function claim_head(stream)
  while true do
    local entry = take(stream)
    if not entry then return nil end
    if live(entry) then return start(entry) end
    drop(stream, entry)
  end
end
local function claim_preferring(stream)
  while true do
    local head = next_undelivered(stream)
    if not head then return nil end
    if live(head) then
      if not preferred[model_of(head)] and waited_ms(head) < wait_ms then
        local other = preferred_behind(stream, head)
        if other then return start_moved(stream, other) end
      end
      return start(take(stream))
    end
    drop(stream, take(stream))
  end
end
-- nil: this stream has no live job, look at the next priority; false: take nothing
for i = 10, #ARGV do
  local stream = p .. ':stream:' .. ARGV[i]
  local taken
  if batch_key ~= '' then
    taken = claim_batch(stream)
  elseif prefer and wait_ms > 0 then
    taken = claim_preferring(stream)
  else
    taken = claim_head(stream)
  end
  if taken ~= nil then return taken end
end
return false
"""
)

# ARGV: prefix, id, worker, step, total, percent, now
PROGRESS = (
    _COMMON
    + """
local job = p .. ':job:' .. ARGV[2]
if not held(job, ARGV[3]) then return 0 end
redis.call('HSET', job, 'step', ARGV[4], 'total_steps', ARGV[5], 'heartbeat_at', ARGV[7])
emit(ARGV[2], 'progress', cjson.encode({step = tonumber(ARGV[4]),
  total_steps = tonumber(ARGV[5]), percent = tonumber(ARGV[6])}), ARGV[7])
return 1
"""
)

# ARGV: prefix, id, worker, result, duration, event data, now, ttl, bucket bounds...
COMPLETE = (
    _COMMON
    + """
local id, now, ttl = ARGV[2], ARGV[7], ARGV[8]
local job = p .. ':job:' .. id
if not held(job, ARGV[3]) then return 0 end
redis.call('HSET', job, 'result', ARGV[4], 'duration_s', ARGV[5],
  'step', redis.call('HGET', job, 'total_steps'))
local duration = tonumber(ARGV[5])
redis.call('HINCRBYFLOAT', p .. ':stats:duration', 'sum', duration)
redis.call('HINCRBY', p .. ':stats:duration', 'count', 1)
for i = 9, #ARGV do
  if duration <= tonumber(ARGV[i]) then
    redis.call('HINCRBY', p .. ':stats:duration', ARGV[i], 1)
  end
end
finish(id, job, 'succeeded', now, ttl)
emit(id, 'completed', ARGV[6], now)
return 1
"""
)

# ARGV: prefix, id, worker, code, message, retryable (0/1), max attempts, now, ttl
FAIL = (
    _COMMON
    + """
local id, now, ttl = ARGV[2], ARGV[8], ARGV[9]
local job = p .. ':job:' .. id
if not held(job, ARGV[3]) then return 0 end
if redis.call('HGET', job, 'cancel_requested') == '1' then
  cancel_job(id, job, 'running', now, ttl)
elseif ARGV[6] == '1' and tonumber(redis.call('HGET', job, 'attempts')) < tonumber(ARGV[7]) then
  requeue(id, job, ARGV[4], now)
else
  fail_job(id, job, ARGV[4], ARGV[5], now, ttl)
end
return 1
"""
)

# ARGV: prefix, id, now, ttl
CANCEL = (
    _COMMON
    + """
local id = ARGV[2]
local job = p .. ':job:' .. id
local status = redis.call('HGET', job, 'status')
if not status then return -1 end
if status == 'queued' then
  cancel_job(id, job, 'queued', ARGV[3], ARGV[4])
elseif status == 'running' then
  redis.call('HSET', job, 'cancel_requested', 1)
end
return 1
"""
)

# ARGV: prefix, id, worker, now, ttl
MARK_CANCELED = (
    _COMMON
    + """
local job = p .. ':job:' .. ARGV[2]
if not held(job, ARGV[3]) then return 0 end
cancel_job(ARGV[2], job, 'running', ARGV[4], ARGV[5])
return 1
"""
)

# ARGV: prefix, id, expected worker or '', stale-before time or '', max attempts, now, ttl
# Requeues (or dead-letters) one running job if it is still held as observed.
RECLAIM_ONE = (
    _COMMON
    + """
local id, now, ttl = ARGV[2], ARGV[6], ARGV[7]
local job = p .. ':job:' .. id
if redis.call('HGET', job, 'status') ~= 'running' then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', job, 'worker_id') ~= ARGV[3] then return 0 end
local beat = tonumber(redis.call('HGET', job, 'heartbeat_at') or 0)
if ARGV[4] ~= '' and beat >= tonumber(ARGV[4]) then return 0 end
local attempts = tonumber(redis.call('HGET', job, 'attempts'))
if redis.call('HGET', job, 'cancel_requested') == '1' then
  cancel_job(id, job, 'worker_lost', now, ttl)
elseif attempts < tonumber(ARGV[5]) then
  requeue(id, job, 'worker_lost', now)
else
  redis.call('XADD', p .. ':dead', '*', 'job', id, 'attempts', attempts)
  fail_job(id, job, 'worker_lost', 'the worker running this job stopped ' .. attempts ..
    ' times (crash, out of memory or killed); not retrying', now, ttl)
end
return 1
"""
)
