# Natgrad.jl against a real natgrad-server child process: updates equal a
# plain-Julia reference, layouts survive the row-major wire, errors carry
# their gRPC codes. ENV["NATGRAD_SERVER"] / ENV["NATGRAD_LIB"] override the
# binaries found in the repository's build/.
using Natgrad
using Random
using Test

const REPO = normpath(joinpath(@__DIR__, "..", "..", ".."))
const SERVER = get(ENV, "NATGRAD_SERVER", joinpath(REPO, "build", "server", "natgrad-server"))

function start_server()
    isfile(SERVER) || error("natgrad-server not found at $SERVER (set ENV[\"NATGRAD_SERVER\"])")
    port_file = tempname()
    proc = run(pipeline(`$SERVER --address=127.0.0.1:0 --port_file=$port_file
                         --inversion_backend=cpu --shutdown_grace_s=1`;
                        stdout = devnull, stderr = devnull); wait = false)
    deadline = time() + 60
    while time() < deadline
        if isfile(port_file)
            port = tryparse(Int, strip(read(port_file, String)))
            port !== nothing && port > 0 && return proc, port
        end
        process_running(proc) || error("natgrad-server exited early")
        sleep(0.02)
    end
    kill(proc)
    error("natgrad-server did not report its port")
end

# Heavy-ball SGD (server: m = mu m + g; delta = -lr m).
mutable struct SgdReference
    lr::Float64
    mu::Float64
    m::Vector{Any}
end
sgd_reference(lr, mu, xs) = SgdReference(lr, mu, Any[zero(x) for x in xs])
function reference_deltas!(r::SgdReference, gs)
    for i in eachindex(gs)
        r.m[i] = r.mu .* r.m[i] .+ gs[i]
    end
    return [-r.lr .* m for m in r.m]
end

proc, port = start_server()
const TARGET = "127.0.0.1:$port"

try
    @testset "Natgrad.jl" begin
        @testset "row-major wire layout" begin
            x = [1 2 3; 4 5 6]  # 2x3: row-major order is 1..6
            @test Natgrad._to_wire(Float32, x) == Float32[1, 2, 3, 4, 5, 6]
            @test Natgrad._from_wire(Float32[1, 2, 3, 4, 5, 6], (2, 3), Float64) == Float64.(x)
            y = reshape(collect(1.0:24.0), 2, 3, 4)
            # Row-major: the last index moves fastest.
            w = Natgrad._to_wire(Float64, y)
            @test w[1:4] == [y[1, 1, 1], y[1, 1, 2], y[1, 1, 3], y[1, 1, 4]]
            @test Natgrad._from_wire(w, size(y), Float64) == y
            v = Float32[1, 2, 3]
            @test Natgrad._to_wire(Float32, v) == v
            @test Natgrad._from_wire(copy(v), (3,), Float32) == v
        end

        client = Client(TARGET; initial_backoff_ms = 5)

        @testset "Session matches plain-Julia SGD (float64)" begin
            rng = MersenneTwister(1)
            s = Session(client, ["w" => (:sgd, (3, 4)), "b" => (:sgd, (4,))];
                        learning_rate = 0.1, momentum = 0.9, state_float64 = true)
            @test startswith(s.name, "sessions/")
            @test s.blocks == ["w", "b"]
            @test last_step(s) == 0
            ref = sgd_reference(0.1, 0.9, [zeros(3, 4), zeros(4)])
            for t in 1:20
                gs = [randn(rng, 3, 4), randn(rng, 4)]
                ds = step!(s, gs; loss = 1.0 / t)
                want = reference_deltas!(ref, gs)
                @test size(ds[1]) == (3, 4) && eltype(ds[1]) == Float64
                @test ds[1] ≈ want[1] rtol = 1e-12
                @test ds[2] ≈ want[2] rtol = 1e-12
            end
            @test last_step(s) == 20
            delete!(s)
            err = try
                step!(s, [randn(3, 4), randn(4)])
                nothing
            catch e
                e
            end
            @test err isa NatgradError && err.code == 5 && err.status == :NOT_FOUND
            close(s)
        end

        @testset "float32 and a per-block learning rate" begin
            s = Session(client, ["w" => (:sgd, (2, 3))];
                        hparams = Dict("w:learning_rate" => 0.5))
            g = Float32[1 -2 3; -4 5 -6]
            d = step!(s, [g])[1]
            @test eltype(d) == Float32
            @test d ≈ -0.5f0 .* g
            close(s)
        end

        @testset "NatgradOptimiser: update! and apply!" begin
            rng = MersenneTwister(2)
            xs = [randn(rng, 5, 3), randn(rng, 3)]
            opt = NatgradOptimiser(client, xs; kind = :sgd, names = ["W", "bias"],
                                   learning_rate = 0.05, momentum = 0.5, state_float64 = true)
            ref = sgd_reference(0.05, 0.5, xs)
            expected = deepcopy(xs)
            for t in 1:10
                # Gradient of 0.5 |x|^2 is x: the iterates shrink towards 0.
                gs = [copy(x) for x in xs]
                Natgrad.update!(opt, xs, gs)
                for (e, d) in zip(expected, reference_deltas!(ref, gs))
                    e .+= d
                end
                @test xs[1] ≈ expected[1] rtol = 1e-12
                @test xs[2] ≈ expected[2] rtol = 1e-12
            end
            gs = [copy(x) for x in xs]
            before = deepcopy(xs)
            dxs = Natgrad.apply!(opt, xs, gs)
            @test xs == before  # apply! does not touch the parameters
            want = reference_deltas!(ref, gs)
            @test dxs[1] ≈ -want[1] rtol = 1e-12  # Optimisers.jl: x .-= dx
            @test dxs[2] ≈ -want[2] rtol = 1e-12
            delete!(opt.session)
        end

        @testset "open by name continues the session" begin
            s = Session(client, ["w" => (:sgd, (2,))]; learning_rate = 1.0, session_id = "julia-open")
            @test s.name == "sessions/julia-open"
            step!(s, [[1.0, 2.0]])
            close(s)  # frees the stream so another handle may step
            t = Session(client, "sessions/julia-open")
            @test t.blocks == ["w"]
            @test last_step(t) == 1
            @test step!(t, [[1.0, 1.0]])[1] ≈ [-1.0, -1.0]
            @test last_step(t) == 2
            delete!(t)
        end

        @testset "errors carry gRPC codes" begin
            e = try
                Session(client, "sessions/no-such-session")
            catch err
                err
            end
            @test e isa NatgradError && e.status == :NOT_FOUND && occursin("no-such-session", e.message)

            s = Session(client, ["w" => (:sgd, (3, 4))])
            e = try
                step!(s, [randn(4, 3)])  # transposed
            catch err
                err
            end
            @test e isa NatgradError && e.code == 3 && e.status == :INVALID_ARGUMENT
            @test last_step(s) == 0  # rejected steps change nothing
            e = try
                Session(client, ["w" => (:sgd, (3,))]; learning_rte = 0.1)
            catch err
                err
            end
            @test e isa NatgradError && e.status == :INVALID_ARGUMENT && occursin("learning_rte", e.message)
            delete!(s)

            down = Client("127.0.0.1:1"; max_retries = 0)
            e = try
                Session(down, ["w" => (:sgd, (3,))])
            catch err
                err
            end
            @test e isa NatgradError && e.code == 14 && e.status == :UNAVAILABLE
            sprint(showerror, e)  # printable
        end

        @testset "kfac_dense (when the server has it)" begin
            d_out, d_in, n = 3, 4, 16
            s = try
                Session(client, ["dense" => (:kfac_dense, (d_out, d_in + 1))];
                        has_bias = true, learning_rate = 0.1, damping = 0.01)
            catch e
                e isa NatgradError && e.status == :UNIMPLEMENTED || rethrow()
                @info "server built without kfac_dense; skipping" e.message
                nothing
            end
            if s !== nothing
                rng = MersenneTwister(3)
                g = randn(rng, Float32, d_out, d_in + 1)
                a = randn(rng, Float32, d_in, n)    # Flux layout (features, batch)
                og = randn(rng, Float32, d_out, n)
                d = step!(s, [g]; kfac = [(a, og)])[1]
                @test size(d) == size(g)
                @test all(isfinite, d)
                # A natural-gradient step is a descent direction.
                @test sum(d .* g) < 0
                delete!(s)
            end
        end

        close(client)
    end
finally
    kill(proc)
end
