"""Parses the deploy/ configs with the node's own loader (--print-config):
the ConfigMap TOML through the StatefulSet start script (stub getent),
every compose node service's environment (both compose files), and the
two-datacenter manifests' config and start script for each of their six
pods. Run by deploy/check.sh."""
import os, re, secrets, subprocess, sys, tempfile, yaml
root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
work = tempfile.mkdtemp(prefix="saferchat-deploy-check-")
node = os.environ.get("SAFERCHAT_NODE_BIN", os.path.join(root, "target/debug/saferchat-node"))
ok = True
# What an operator generates: the files ship no secret.
generated = {"SAFERCHAT_ADMIN_TOKEN": secrets.token_urlsafe(32),
             "SAFERCHAT_SESSION_SECRET": secrets.token_urlsafe(32)}
# 1. Kubernetes: the ConfigMap's TOML + the StatefulSet's start script, run
#    with a stub getent, ending in the node's own --print-config.
docs = list(yaml.safe_load_all(open(f"{root}/deploy/kubernetes/saferchat.yaml")))
cm = next(d for d in docs if d["kind"] == "ConfigMap")
open(os.path.join(work, "config.toml"), "w").write(cm["data"]["config.toml"])
sts = next(d for d in docs if d["kind"] == "StatefulSet")
c = sts["spec"]["template"]["spec"]["containers"][0]
config = os.path.join(work, "config.toml")
script = c["args"][0].replace("/usr/local/bin/saferchat-node", node).replace(
    "--config /etc/saferchat/config/config.toml", f"--config {config} --print-config")
assert "--print-config" in script, "the start script execs the node with --config"
open(os.path.join(work, "getent"), "w").write('#!/bin/sh\ncase "$2" in saferchat-0) echo "10.96.0.10 $2";; saferchat-1) echo "10.96.0.11 $2";; saferchat-2) echo "10.96.0.12 $2";; esac\n')
os.chmod(os.path.join(work, "getent"), 0o755)
for pod in ["saferchat-0", "saferchat-1", "saferchat-2"]:
    env = {"PATH": work + ":/usr/bin:/bin", "HOSTNAME": pod, **generated}
    env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
    r = subprocess.run(c["command"] + [script], env=env, capture_output=True, text=True)
    print(f"== k8s {pod}: exit {r.returncode}")
    if r.returncode != 0:
        ok = False; print(r.stderr)
    else:
        out = r.stdout
        for key in ["node_id", "backend", "keyspace", "replication"]:
            print("  ", next(l for l in out.splitlines() if l.startswith(key)))
        print("   peers:", out.count("[[peers]]"))
# 2. Compose: every node service's environment, as compose would merge it,
#    with ${VAR:?message} taken from the generated secrets (and an unset one
#    an error, as compose makes it).
def interpolate(value):
    def one(m):
        if m.group(1) not in generated:
            raise SystemExit(f"compose needs {m.group(1)}, which this check does not set")
        return generated[m.group(1)]
    return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", one, value)
for path in ["compose/compose.yaml", "compose/two-datacenters.yaml"]:
    compose = yaml.safe_load(open(f"{root}/deploy/{path}"))
    for name, svc in compose["services"].items():
        if not name.startswith("node"):
            continue
        env = {"PATH": "/usr/bin:/bin"}
        env.update({k: interpolate(str(v)) for k, v in svc["environment"].items()})
        r = subprocess.run([node, "--print-config"], env=env, capture_output=True, text=True)
        print(f"== {path} {name}: exit {r.returncode}")
        if r.returncode != 0:
            ok = False; print(r.stderr)
        else:
            out = r.stdout
            for key in ["node_id", "listen", "backend", "contact_points", "datacenter"]:
                print("  ", [l for l in out.splitlines() if l.startswith(key)])
            print("   peers:", out.count("[[peers]]"))
# 3. Kubernetes in two datacenters: the ConfigMap's config.toml and
#    start.sh, run for every pod of both StatefulSets with that
#    StatefulSet's environment and a stub getent for the six node Services.
docs = list(yaml.safe_load_all(open(f"{root}/deploy/kubernetes/two-datacenters/saferchat.yaml")))
cm = next(d for d in docs if d["kind"] == "ConfigMap")
two = os.path.join(work, "two")
os.makedirs(two)
config = os.path.join(two, "config.toml")
open(config, "w").write(cm["data"]["config.toml"])
start = cm["data"]["start.sh"].replace("/usr/local/bin/saferchat-node", node).replace(
    "--config /etc/saferchat/config/config.toml", f"--config {config} --print-config")
assert "--print-config" in start, "start.sh execs the node with --config"
open(os.path.join(two, "start.sh"), "w").write(start)
cases = " ".join(f'saferchat-{dc}-{i}) echo "10.96.{n}.{i} $2";;'
                 for n, dc in enumerate(["dc1", "dc2"], 1) for i in range(3))
open(os.path.join(two, "getent"), "w").write(f'#!/bin/sh\ncase "$2" in {cases} esac\n')
os.chmod(os.path.join(two, "getent"), 0o755)
for sts in (d for d in docs if d["kind"] == "StatefulSet"):
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][-1] == "/etc/saferchat/config/start.sh", c["command"]
    for ordinal in range(sts["spec"]["replicas"]):
        pod = f'{sts["metadata"]["name"]}-{ordinal}'
        env = {"PATH": two + ":/usr/bin:/bin", "HOSTNAME": pod, **generated}
        env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
        r = subprocess.run(["/bin/sh", os.path.join(two, "start.sh")], env=env,
                           capture_output=True, text=True)
        print(f"== k8s two datacenters {pod}: exit {r.returncode}")
        if r.returncode != 0:
            ok = False; print(r.stderr)
            continue
        out = r.stdout
        for key in ["node_id", "datacenter", "replication"]:
            print("  ", [l for l in out.splitlines() if l.startswith(key)][:1])
        dc = env["SAFERCHAT_DATACENTER"]
        other = "dc2" if dc == "dc1" else "dc1"
        local = f"cassandra-{dc}-0.cassandra-{dc}:9042" in out and f"cassandra-{other}" not in out
        print("   peers:", out.count("[[peers]]"), "| contact points in its datacenter:", local)
        # The node's own datacenter comes first in --print-config, then
        # each peer's, then storage.cassandra's.
        dcs = [l for l in out.splitlines() if l.startswith("datacenter")]
        if out.count("[[peers]]") != 5 or not local or dcs[0] != f'datacenter = "{dc}"' \
                or dcs[-1] != f'datacenter = "{dc}"' or sorted(dcs[1:-1]).count('datacenter = "dc1"') != (2 if dc == "dc1" else 3):
            ok = False; print("   expected five peers (three in dc1, three in dc2 with itself), its own datacenter and Cassandra")
sys.exit(0 if ok else 1)
