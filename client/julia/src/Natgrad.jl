"""
    Natgrad

Julia client of natgrad-server: server-side natural-gradient (K-FAC) and
first-order optimizer state, driven from Julia through the C ABI of
`libnatgrad_c` (client/c/natgrad.h) with `ccall`.

Layout: Julia arrays are column-major, the wire is row-major (docs/architecture.md).
A block's shape is the Julia `size` of the parameter, and this package
permutes every array to row-major before sending and back after receiving,
so `delta` has the parameter's size and element order. A Flux `Dense` weight
of size `(out, in)` is therefore a K-FAC block of shape `[d_out, d_in]`, and
K-FAC activations / output gradients are passed in Flux's `(features, batch)`
layout, whose memory already is the wire's `[batch, features]`.
"""
module Natgrad

using Libdl

export Client, Session, NatgradError, NatgradOptimiser, step!, last_step

const ABI_VERSION = 1

# ---------------------------------------------------------------------------
# Loading libnatgrad_c. Every symbol is resolved once, up front, so later
# calls (finalizers included) never take a lock.

const _SYMBOLS = (:natgrad_abi_version, :natgrad_last_error, :natgrad_status_name,
    :natgrad_client_options_init, :natgrad_client_new_with_options, :natgrad_client_free,
    :natgrad_session_create, :natgrad_session_create_simple, :natgrad_session_open,
    :natgrad_session_name, :natgrad_session_block_count, :natgrad_session_block_name,
    :natgrad_session_last_step, :natgrad_session_step, :natgrad_session_step_f64,
    :natgrad_session_delete, :natgrad_session_free)

const _syms = Dict{Symbol,Ptr{Cvoid}}()
const _loaded = Ref(false)
const _load_lock = ReentrantLock()

"""
    library_path()

`ENV["NATGRAD_LIB"]` if set, else `build/client/c/libnatgrad_c` of the
repository this package sits in.
"""
function library_path()
    p = get(ENV, "NATGRAD_LIB", "")
    isempty(p) || return p
    return normpath(joinpath(@__DIR__, "..", "..", "..", "build", "client", "c",
                             "libnatgrad_c." * Libdl.dlext))
end

function _load()
    lock(_load_lock) do
        _loaded[] && return
        path = library_path()
        isfile(path) || error("libnatgrad_c not found at $path: build the CMake target " *
                              "natgrad_c or set ENV[\"NATGRAD_LIB\"]")
        handle = Libdl.dlopen(path)
        for s in _SYMBOLS
            _syms[s] = Libdl.dlsym(handle, s)
        end
        v = ccall(_syms[:natgrad_abi_version], Int32, ())
        v == ABI_VERSION || error("$path has C ABI version $v, this package needs $ABI_VERSION")
        _loaded[] = true
    end
    return
end

@inline function _fn(name::Symbol)
    _loaded[] || _load()
    return _syms[name]
end

# ---------------------------------------------------------------------------
# Errors

const STATUS_NAMES = (:OK, :CANCELLED, :UNKNOWN, :INVALID_ARGUMENT, :DEADLINE_EXCEEDED,
    :NOT_FOUND, :ALREADY_EXISTS, :PERMISSION_DENIED, :RESOURCE_EXHAUSTED,
    :FAILED_PRECONDITION, :ABORTED, :OUT_OF_RANGE, :UNIMPLEMENTED, :INTERNAL, :UNAVAILABLE,
    :DATA_LOSS, :UNAUTHENTICATED)

"""
    NatgradError(code, status, message)

A failed call: `code` is the gRPC status code (3 INVALID_ARGUMENT, 5
NOT_FOUND, 9 FAILED_PRECONDITION, 14 UNAVAILABLE, 16 UNAUTHENTICATED, ...),
`status` its name as a Symbol, `message` the server's or library's reason.
"""
struct NatgradError <: Exception
    code::Int32
    status::Symbol
    message::String
end

Base.showerror(io::IO, e::NatgradError) =
    print(io, "NatgradError: ", e.status, " (", e.code, "): ", e.message)

_status_symbol(code::Integer) = 0 <= code <= 16 ? STATUS_NAMES[code + 1] : :UNKNOWN

# The C library's message is thread-local: read it right after the failing
# call, with no yield point in between (a task may change threads there).
function _check(rc::Integer)
    rc == 0 && return nothing
    msg = unsafe_string(ccall(_syms[:natgrad_last_error], Cstring, ()))
    throw(NatgradError(Int32(rc), _status_symbol(rc), msg))
end

function _cstrings(strs::Vector{String})
    for s in strs
        occursin('\0', s) && throw(ArgumentError("string contains NUL: $(repr(s))"))
    end
    return Ptr{UInt8}[pointer(s) for s in strs]
end

# ---------------------------------------------------------------------------
# Client

# Mirrors natgrad_client_options (client/c/natgrad.h); same field order.
struct _Options
    max_retries::Int32
    initial_backoff_ms::Int32
    max_message_bytes::Int64
    max_blocks_per_message::Int32
end

"""
    Client(target = "127.0.0.1:50051"; token = nothing, max_retries = nothing,
           initial_backoff_ms = nothing, max_message_bytes = nothing,
           max_blocks_per_message = nothing)

A connection to natgrad-server (insecure channel; `token` is sent as
`authorization: Bearer <token>`). Options left `nothing` keep the C
library's defaults (8 retries of a dropped step, 20 ms first backoff, 256 MiB
messages). `close(client)` releases it early; sessions keep working.
"""
mutable struct Client
    ptr::Ptr{Cvoid}
    target::String

    function Client(target::AbstractString = "127.0.0.1:50051"; token = nothing,
                    max_retries = nothing, initial_backoff_ms = nothing,
                    max_message_bytes = nothing, max_blocks_per_message = nothing)
        d = Ref(_Options(0, 0, 0, 0))
        ccall(_fn(:natgrad_client_options_init), Cvoid, (Ptr{_Options},), d)
        o = _Options(
            max_retries === nothing ? d[].max_retries : Int32(max_retries),
            initial_backoff_ms === nothing ? d[].initial_backoff_ms : Int32(initial_backoff_ms),
            max_message_bytes === nothing ? d[].max_message_bytes : Int64(max_message_bytes),
            max_blocks_per_message === nothing ? d[].max_blocks_per_message :
                Int32(max_blocks_per_message))
        out = Ref{Ptr{Cvoid}}(C_NULL)
        tok = token === nothing ? "" : String(token)
        _check(ccall(_fn(:natgrad_client_new_with_options), Cint,
                     (Cstring, Cstring, Ref{_Options}, Ref{Ptr{Cvoid}}),
                     String(target), tok, o, out))
        c = new(out[], String(target))
        finalizer(close, c)
        return c
    end
end

function Base.close(c::Client)
    if c.ptr != C_NULL
        ccall(_fn(:natgrad_client_free), Cvoid, (Ptr{Cvoid},), c.ptr)
        c.ptr = C_NULL
    end
    return nothing
end

Base.show(io::IO, c::Client) = print(io, "Natgrad.Client(", repr(c.target), ")")

# ---------------------------------------------------------------------------
# Session

"""
A natgrad session: server-side optimizer state for named parameter blocks
plus this process's Step stream. Create with

    Session(client, ["w" => (:sgd, (3, 4)), "b" => (:adam, (4,))];
            learning_rate = 0.1, momentum = 0.9,
            hparams = Dict("b:learning_rate" => 1e-3), session_id = nothing)

(kinds `:sgd`, `:adam`, `:kfac_dense`; shapes are Julia sizes; keyword
hyperparameters apply to every block whose kind has them, `hparams` keys
`"<block>:<key>"` to one block; see `natgrad_session_create_simple` in
client/c/natgrad.h for the keys), from a serialized `natgrad.v1.SessionConfig`
with `Session(client, bytes::Vector{UInt8})`, or open an existing one with
`Session(client, "sessions/<id>")`. `step!` sends steps, `delete!` removes it
from the server, `close` releases the handle (the server keeps the session).
"""
mutable struct Session
    ptr::Ptr{Cvoid}
    client::Client
    name::String
    blocks::Vector{String}

    function Session(ptr::Ptr{Cvoid}, client::Client)
        name = unsafe_string(ccall(_fn(:natgrad_session_name), Cstring, (Ptr{Cvoid},), ptr))
        n = ccall(_fn(:natgrad_session_block_count), Csize_t, (Ptr{Cvoid},), ptr)
        blocks = String[unsafe_string(ccall(_fn(:natgrad_session_block_name), Cstring,
                                            (Ptr{Cvoid}, Csize_t), ptr, i - 1)) for i in 1:n]
        s = new(ptr, client, name, blocks)
        finalizer(close, s)
        return s
    end
end

_session_id(id) = id === nothing ? C_NULL : String(id)

function Session(client::Client, blocks::AbstractVector{<:Pair}; session_id = nothing,
                 hparams = Dict{String,Float64}(), kw...)
    names = String[string(first(b)) for b in blocks]
    kinds = String[string(last(b)[1]) for b in blocks]
    shapes = [Tuple(last(b)[2]) for b in blocks]
    nd = Int32[length(s) for s in shapes]
    dims = Int64[d for s in shapes for d in s]
    keys = String[string(k) for k in Base.keys(kw)]
    vals = Float64[Float64(v) for v in values(kw)]
    for (k, v) in hparams
        push!(keys, string(k))
        push!(vals, Float64(v))
    end
    out = Ref{Ptr{Cvoid}}(C_NULL)
    sid = _session_id(session_id)
    GC.@preserve names kinds keys begin
        np, kp, hk = _cstrings(names), _cstrings(kinds), _cstrings(keys)
        _check(ccall(_fn(:natgrad_session_create_simple), Cint,
                     (Ptr{Cvoid}, Csize_t, Ptr{Ptr{UInt8}}, Ptr{Ptr{UInt8}}, Ptr{Int32},
                      Ptr{Int64}, Csize_t, Ptr{Ptr{UInt8}}, Ptr{Float64}, Ptr{UInt8},
                      Ref{Ptr{Cvoid}}),
                     client.ptr, length(names), np, kp, nd, dims, length(keys), hk, vals, sid,
                     out))
    end
    return Session(out[], client)
end

function Session(client::Client, config::Vector{UInt8}; session_id = nothing)
    out = Ref{Ptr{Cvoid}}(C_NULL)
    _check(ccall(_fn(:natgrad_session_create), Cint,
                 (Ptr{Cvoid}, Ptr{UInt8}, Csize_t, Ptr{UInt8}, Ref{Ptr{Cvoid}}),
                 client.ptr, config, length(config), _session_id(session_id), out))
    return Session(out[], client)
end

function Session(client::Client, name::AbstractString)
    out = Ref{Ptr{Cvoid}}(C_NULL)
    _check(ccall(_fn(:natgrad_session_open), Cint, (Ptr{Cvoid}, Cstring, Ref{Ptr{Cvoid}}),
                 client.ptr, String(name), out))
    return Session(out[], client)
end

function Base.close(s::Session)
    if s.ptr != C_NULL
        ccall(_fn(:natgrad_session_free), Cvoid, (Ptr{Cvoid},), s.ptr)
        s.ptr = C_NULL
    end
    return nothing
end

"""
    delete!(session)

Deletes the session on the server; later steps throw NOT_FOUND.
"""
function Base.delete!(s::Session)
    _check(ccall(_fn(:natgrad_session_delete), Cint, (Ptr{Cvoid},), s.ptr))
    return s
end

"""
    last_step(session) -> Int

The last step applied (0 before the first); the next `step!` is number
`last_step(session) + 1`.
"""
function last_step(s::Session)
    out = Ref{Int64}(0)
    _check(ccall(_fn(:natgrad_session_last_step), Cint, (Ptr{Cvoid}, Ref{Int64}), s.ptr, out))
    return Int(out[])
end

Base.show(io::IO, s::Session) =
    print(io, "Natgrad.Session(", repr(s.name), ", blocks = ", s.blocks, ")")

# ---------------------------------------------------------------------------
# Layout: Julia column-major <-> wire row-major.

# Row-major copy of x as a flat Vector{T}: reversing the dimensions of a
# column-major array gives the row-major order of the original.
function _to_wire(::Type{T}, x::AbstractArray) where {T}
    N = ndims(x)
    N <= 1 && return Vector{T}(vec(x))
    return vec(Array{T}(permutedims(x, ntuple(i -> N + 1 - i, N))))
end

# Inverse of _to_wire: a row-major buffer back to an array of size sz.
function _from_wire(buf::Vector, sz::Tuple, ::Type{S}) where {S}
    N = length(sz)
    N <= 1 && return reshape(Vector{S}(buf), sz)
    return Array{S}(permutedims(reshape(buf, reverse(sz)), ntuple(i -> N + 1 - i, N)))
end

# K-FAC statistics in Flux layout (features, batch): the memory of a
# column-major (d, n) array is the row-major [n, d] the wire wants.
_stats(::Type{T}, a::AbstractMatrix) where {T} = Array{T}(a)

for (T, fn) in ((Float32, :natgrad_session_step), (Float64, :natgrad_session_step_f64))
    @eval function _cstep(::Type{$T}, s::Session, names, nd, dims, g, p, rows, a, og, loss, d)
        GC.@preserve names g p a og d begin
            np = _cstrings(names)
            gp = Ptr{$T}[pointer(x) for x in g]
            pp = p === nothing ? Ptr{Ptr{$T}}(C_NULL) :
                 Ptr{$T}[x === nothing ? Ptr{$T}(C_NULL) : pointer(x) for x in p]
            ap = Ptr{$T}[x === nothing ? Ptr{$T}(C_NULL) : pointer(x) for x in a]
            op = Ptr{$T}[x === nothing ? Ptr{$T}(C_NULL) : pointer(x) for x in og]
            dp = Ptr{$T}[pointer(x) for x in d]
            rc = ccall(_fn($(QuoteNode(fn))), Cint,
                       (Ptr{Cvoid}, Csize_t, Ptr{Ptr{UInt8}}, Ptr{Int32}, Ptr{Int64},
                        Ptr{Ptr{$T}}, Ptr{Ptr{$T}}, Ptr{Int64}, Ptr{Ptr{$T}}, Ptr{Ptr{$T}},
                        Cdouble, Ptr{Ptr{$T}}),
                       s.ptr, length(names), np, nd, dims, gp, pp, rows, ap, op, loss, dp)
            _check(rc)
        end
    end
end

"""
    step!(session, grads; names = session.blocks, params = nothing,
          kfac = nothing, loss = nothing) -> deltas

Sends one step: `grads[i]` is dL/dW of the mean loss for block `names[i]`
(any Julia array of that block's size). `params` (same layout, entries may
be `nothing`) is needed for weight decay. `kfac[i]` is `nothing` or
`(activations, output_gradients)` for a `:kfac_dense` block, in Flux layout
`(d_in, n)` and `(d_out, n)` (activations without the bias row). `loss`
drives adaptive damping. Returns the updates, arrays of the gradients' sizes
and element types: the caller does `W .+= delta`. Float64 gradients travel
as float64, everything else as float32. Throws `NatgradError`; a rejected
step changes nothing on the server.
"""
function step!(s::Session, grads::AbstractVector; names = s.blocks, params = nothing,
               kfac = nothing, loss = nothing)
    n = length(grads)
    length(names) == n ||
        throw(ArgumentError("$(length(names)) names for $n gradients"))
    T = any(g -> eltype(g) == Float64, grads) ? Float64 : Float32
    g = [_to_wire(T, x) for x in grads]
    p = params === nothing ? nothing :
        [x === nothing ? nothing : _to_wire(T, x) for x in params]
    p === nothing || length(p) == n || throw(ArgumentError("params must have $n entries"))
    nd = Int32[ndims(x) for x in grads]
    dims = Int64[d for x in grads for d in size(x)]
    rows = zeros(Int64, n)
    a = Vector{Union{Nothing,Matrix{T}}}(nothing, n)
    og = Vector{Union{Nothing,Matrix{T}}}(nothing, n)
    if kfac !== nothing
        length(kfac) == n || throw(ArgumentError("kfac must have $n entries"))
        for i in 1:n
            kfac[i] === nothing && continue
            act, out = kfac[i]
            size(act, 2) == size(out, 2) || throw(ArgumentError(
                "block $(names[i]): activations and output gradients differ in batch size"))
            a[i], og[i], rows[i] = _stats(T, act), _stats(T, out), size(act, 2)
        end
    end
    d = [Vector{T}(undef, length(x)) for x in grads]
    _cstep(T, s, String[string(x) for x in names], nd, dims, g, p, rows, a, og,
           loss === nothing ? NaN : Float64(loss), d)
    return [_from_wire(d[i], size(grads[i]), _eltype_out(grads[i])) for i in 1:n]
end

_eltype_out(x::AbstractArray{S}) where {S<:AbstractFloat} = S
_eltype_out(x::AbstractArray) = Float64

# ---------------------------------------------------------------------------
# Flux / Optimisers.jl-style wrapper

"""
    NatgradOptimiser(session; names = session.blocks, send_params = true)
    NatgradOptimiser(client, xs; kind = :adam, names = ["p1", ...],
                     session_id = nothing, hparams = Dict(), kw...)

An optimiser for a vector of parameter arrays `xs` (e.g. `Flux.params`
collected in a fixed order), block `names[i]` holding `xs[i]`. The second
form creates a session with one `kind` block per parameter, of its size.
The optimizer state lives on the server; each call below is one step.

- `Natgrad.update!(opt, xs, gs; loss, kfac)`: `xs[i] .+= delta[i]` in place,
  returns `xs` (what `Flux.update!` / `Optimisers.update!` do).
- `Natgrad.apply!(opt, xs, gs; loss, kfac)`: returns `dxs` without touching
  `xs`, in Optimisers.jl's convention of an amount to subtract:
  `xs[i] .-= dxs[i]` is the step (`dxs = -delta`).

With `send_params` the current values travel with each step (weight decay
needs them); turn it off to save bandwidth when no block decays.
"""
struct NatgradOptimiser
    session::Session
    names::Vector{String}
    send_params::Bool
end

NatgradOptimiser(session::Session; names = session.blocks, send_params = true) =
    NatgradOptimiser(session, String[string(x) for x in names], send_params)

function NatgradOptimiser(client::Client, xs::AbstractVector; kind = :adam,
                          names = ["p$i" for i in 1:length(xs)], session_id = nothing,
                          hparams = Dict{String,Float64}(), send_params = true, kw...)
    blocks = [string(names[i]) => (kind, size(xs[i])) for i in 1:length(xs)]
    session = Session(client, blocks; session_id = session_id, hparams = hparams, kw...)
    return NatgradOptimiser(session; names = names, send_params = send_params)
end

function _deltas(opt::NatgradOptimiser, xs, gs, loss, kfac)
    length(xs) == length(gs) ||
        throw(ArgumentError("$(length(xs)) parameters but $(length(gs)) gradients"))
    return step!(opt.session, gs; names = opt.names,
                 params = opt.send_params ? xs : nothing, loss = loss, kfac = kfac)
end

"""
    Natgrad.update!(opt::NatgradOptimiser, xs, gs; loss = nothing, kfac = nothing) -> xs
"""
function update!(opt::NatgradOptimiser, xs::AbstractVector, gs::AbstractVector;
                 loss = nothing, kfac = nothing)
    for (x, d) in zip(xs, _deltas(opt, xs, gs, loss, kfac))
        x .+= d
    end
    return xs
end

"""
    Natgrad.apply!(opt::NatgradOptimiser, xs, gs; loss = nothing, kfac = nothing) -> dxs
"""
apply!(opt::NatgradOptimiser, xs::AbstractVector, gs::AbstractVector; loss = nothing,
       kfac = nothing) = [-d for d in _deltas(opt, xs, gs, loss, kfac)]

Base.show(io::IO, o::NatgradOptimiser) =
    print(io, "NatgradOptimiser(", repr(o.session.name), ", ", o.names, ")")

end # module
