"""A protocol peer standing in for a Universal Robots controller, so that ur_rtde 1.6.5 runs unmodified.

No URSim can be obtained here, so this module speaks the controller's side of the documented interfaces on
loopback, behind a kinematic UR5e (DH forward kinematics, damped least-squares differential IK):

- RTDE (port 30004, protocol version 2): REQUEST_PROTOCOL_VERSION 'V', GET_URCONTROL_VERSION 'v', TEXT_MESSAGE
  'M', CONTROL_PACKAGE_SETUP_OUTPUTS 'O' (frequency + variable names -> recipe id + types, NOT_FOUND for a
  name the peer does not serve), CONTROL_PACKAGE_SETUP_INPUTS 'I' (IN_USE for a register another client
  already writes), CONTROL_PACKAGE_START 'S' / PAUSE 'P', DATA_PACKAGE 'U' both ways (big-endian; header
  uint16 size + uint8 type). Outputs go out at each client's requested frequency.
- The script ports (30001/30002/30003): RTDEControlInterface 1.6.5 uploads its control script to 30003. The
  peer checks that it is ur_rtde's `rtde_control` program and then runs an emulation of that script's main
  loop at the register level: input_int_register_0 is the command id, input_double_registers its arguments,
  output_int_register_0 is 1 (ready) / 2 (done with command); the real-time commands (servoL 24, speedL 10)
  signal ready again at once, the others execute once and signal done until the command is cleared (0).
  Emulated commands: moveL 3, speedL 10, speed stop 15, servo stop 16, servoL 24, protective stop 31, stopL
  33, stop script 255. Any other command ends the program with a text message (as a runtime error would on the
  robot), so an unexpected use shows up instead of passing silently.
- The dashboard server (29999, text lines): PolyscopeVersion, get serial number, is in remote control,
  robotmode, safetystatus, programState, power on / power off, brake release, unlock protective stop, close
  safety popup, stop, pause, play (no program file: refused), restart safety.
- The Robotiq URCap socket (63352, text lines): SET <VAR> <n> ... -> ack, GET <VAR> -> "<VAR> <n>" for ACT,
  GTO, POS, PRE, SPE, FOR, STA, OBJ, FLT; the finger position moves toward PRE at a speed set by SPE.

Not covered (see the README's UR section): the primary/secondary interfaces' state packages (nothing that
ur_rtde's ScriptClient reads), real servoL/speedL dynamics (the peer tracks with a first-order lag capped by a
tool speed and acceleration), joint limits, collisions, payload, force mode and the other script commands.

Fault injection: `protective_stop()` (safety mode 3, the program stops, the arm halts; the dashboard's
"unlock protective stop" clears it, but not before `unlock_delay` seconds, as the real controller refuses
within 5 s), `emergency_stop()` / `release_emergency_stop()` (safety mode 7, arm powered off; needs power on
+ brake release afterwards), and `disconnect()` (every socket closed, the listeners too: the network is gone,
the controller runs on); `PeerProcess.kill()` ends the whole controller at once.

ur_rtde's Python calls hold the GIL while they block (its constructors wait for the peer's replies), so the
peer cannot share a process with its client: `PeerProcess` runs it in a child process (spawned, not forked)
and forwards calls to it over a pipe.

Everything binds `host` only (a 127.x.y.z address: ur_rtde's ports are fixed, so a private loopback address
keeps parallel peers apart); all threads are daemons, bounded by `stop()`, which the context manager calls.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

RTDE_PORT = 30004
DASHBOARD_PORT = 29999
SCRIPT_PORTS = (30001, 30002, 30003)
ROBOTIQ_PORT = 63352
ALL_PORTS = (RTDE_PORT, DASHBOARD_PORT, *SCRIPT_PORTS, ROBOTIQ_PORT)

CONTROLLER_VERSION = (5, 11, 1, 108318)  # an e-Series controller (ur_rtde then defaults to 500 Hz)

# UR5e DH parameters (Universal Robots' published values).
_D = (0.1625, 0.0, 0.0, 0.1333, 0.0997, 0.0996)
_A = (0.0, -0.425, -0.3922, 0.0, 0.0, 0.0)
_ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)
HOME_Q = (0.0, -1.9, 1.9, -1.571, -1.571, 0.0)  # elbow up, tool pointing down, about 0.49 m in front

# robot_mode / safety_mode / runtime_state values of the RTDE guide.
ROBOT_MODE_POWER_OFF, ROBOT_MODE_IDLE, ROBOT_MODE_RUNNING = 3, 5, 7
SAFETY_NORMAL, SAFETY_PROTECTIVE_STOP, SAFETY_ROBOT_EMERGENCY_STOP = 1, 3, 7
RUNTIME_STOPPED, RUNTIME_PLAYING, RUNTIME_PAUSED = 1, 2, 4

_OUTPUT_TYPES: dict[str, str] = {
    "timestamp": "DOUBLE",
    "actual_q": "VECTOR6D",
    "actual_qd": "VECTOR6D",
    "target_q": "VECTOR6D",
    "target_qd": "VECTOR6D",
    "actual_TCP_pose": "VECTOR6D",
    "actual_TCP_speed": "VECTOR6D",
    "target_TCP_pose": "VECTOR6D",
    "target_TCP_speed": "VECTOR6D",
    "robot_mode": "INT32",
    "safety_mode": "INT32",
    "safety_status": "INT32",
    "runtime_state": "UINT32",
    "robot_status_bits": "UINT32",
    "safety_status_bits": "UINT32",
    "speed_scaling": "DOUBLE",
    "target_speed_fraction": "DOUBLE",
    "actual_digital_input_bits": "UINT64",
    "actual_digital_output_bits": "UINT64",
    "output_bit_registers0_to_31": "UINT32",
    "output_bit_registers32_to_63": "UINT32",
}
for _i in range(48):
    _OUTPUT_TYPES[f"output_int_register_{_i}"] = "INT32"
    _OUTPUT_TYPES[f"output_double_register_{_i}"] = "DOUBLE"
_INPUT_TYPES: dict[str, str] = {"external_force_torque": "VECTOR6D"}
for _i in range(48):
    _INPUT_TYPES[f"input_int_register_{_i}"] = "INT32"
    _INPUT_TYPES[f"input_double_register_{_i}"] = "DOUBLE"
_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "INT32": "i",
    "UINT32": "I",
    "UINT64": "Q",
    "DOUBLE": "d",
    "VECTOR3D": "3d",
    "VECTOR6D": "6d",
    "VECTOR6INT32": "6i",
    "VECTOR6UINT32": "6I",
}

# Script commands whose loop signals ready again at once (the script's real-time list, as far as used here).
_REALTIME_COMMANDS = frozenset({24, 10})


# ---- kinematics --------------------------------------------------------------------------------------------


def _dh(theta: float, d: float, a: float, alpha: float) -> np.ndarray:
    ct, st, ca, sa = math.cos(theta), math.sin(theta), math.cos(alpha), math.sin(alpha)
    return np.array(
        [[ct, -st * ca, st * sa, a * ct], [st, ct * ca, -ct * sa, a * st], [0, sa, ca, d], [0, 0, 0, 1]]
    )


def forward_kinematics(q: np.ndarray) -> np.ndarray:
    """4x4 base-to-tool transform of the UR5e at joint angles `q`."""
    t = np.eye(4)
    for i in range(6):
        t = t @ _dh(float(q[i]), _D[i], _A[i], _ALPHA[i])
    return t


def rotvec_to_matrix(r: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(r))
    if angle < 1e-12:
        return np.eye(3)
    k = np.asarray(r, dtype=np.float64) / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    cos = max(-1.0, min(1.0, (float(np.trace(m)) - 1.0) / 2.0))
    angle = math.acos(cos)
    if angle < 1e-9:
        return np.zeros(3)
    if math.pi - angle < 1e-6:
        # Near pi the skew part vanishes; take the axis from the symmetric part.
        axis = np.sqrt(np.maximum((np.diag(m) + 1.0) / 2.0, 0.0))
        i = int(np.argmax(axis))
        for j in range(3):
            if j != i and m[i, j] + m[j, i] < 0:
                axis[j] = -axis[j]
        return axis / np.linalg.norm(axis) * angle
    v = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    return v / (2 * math.sin(angle)) * angle


def tcp_pose(q: np.ndarray) -> np.ndarray:
    t = forward_kinematics(q)
    return np.concatenate([t[:3, 3], matrix_to_rotvec(t[:3, :3])])


def _jacobian(q: np.ndarray) -> np.ndarray:
    """Geometric Jacobian (linear; angular) of the tool in the base frame, by finite differences."""
    t0 = forward_kinematics(q)
    jac = np.zeros((6, 6))
    eps = 1e-6
    for i in range(6):
        dq = q.copy()
        dq[i] += eps
        t1 = forward_kinematics(dq)
        jac[:3, i] = (t1[:3, 3] - t0[:3, 3]) / eps
        jac[3:, i] = matrix_to_rotvec(t1[:3, :3] @ t0[:3, :3].T) / eps
    return jac


# ---- the arm -----------------------------------------------------------------------------------------------


@dataclass
class ArmModel:
    """Kinematic arm: a tool twist from the active motion mode, mapped to joint velocities each tick."""

    q: np.ndarray = field(default_factory=lambda: np.array(HOME_Q, dtype=np.float64))
    qd: np.ndarray = field(default_factory=lambda: np.zeros(6))
    twist: np.ndarray = field(default_factory=lambda: np.zeros(6))  # actual tool twist, base frame
    max_tool_speed: float = 1.0  # m/s
    max_tool_acc: float = 5.0  # m/s^2
    max_joint_speed: float = math.pi  # rad/s

    def pose(self) -> np.ndarray:
        return tcp_pose(self.q)

    def step(self, wanted_twist: np.ndarray, dt: float, acc: float | None = None) -> None:
        wanted = np.array(wanted_twist, dtype=np.float64)
        lin = float(np.linalg.norm(wanted[:3]))
        if lin > self.max_tool_speed:
            wanted[:3] *= self.max_tool_speed / lin
        a = self.max_tool_acc if acc is None else min(acc, self.max_tool_acc)
        dv = wanted - self.twist
        n = float(np.linalg.norm(dv[:3]))
        if n > a * dt:
            dv[:3] *= a * dt / n
        self.twist = self.twist + dv
        jac = _jacobian(self.q)
        lam = 1e-3
        qd = jac.T @ np.linalg.solve(jac @ jac.T + lam * np.eye(6), self.twist)
        peak = float(np.max(np.abs(qd)))
        if peak > self.max_joint_speed:
            qd *= self.max_joint_speed / peak
        self.qd = qd
        self.q = self.q + qd * dt

    def halt(self) -> None:
        self.twist = np.zeros(6)
        self.qd = np.zeros(6)


def pose_error_twist(pose: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (linear, rotation-vector) difference target - pose, both UR poses [x, y, z, rx, ry, rz]."""
    rot = rotvec_to_matrix(target[3:]) @ rotvec_to_matrix(pose[3:]).T
    return np.concatenate([target[:3] - pose[:3], matrix_to_rotvec(rot)])


# ---- the peer ----------------------------------------------------------------------------------------------


def free_loopback_address(ports: tuple[int, ...] = ALL_PORTS) -> str:
    """A 127.x.y.z address on which every one of `ports` can be bound."""
    for _ in range(200):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        try:
            for port in ports:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return host
    raise RuntimeError("no loopback address with the UR ports free")


def _names(payload: bytes) -> list[str]:
    # ur_rtde ends its variable list with a comma; the controller ignores the empty name after it.
    return [n for n in payload.decode().split(",") if n]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


@dataclass
class _RtdeClient:
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    output_names: list[str] = field(default_factory=list)
    output_types: list[str] = field(default_factory=list)
    frequency: float = 125.0
    inputs: dict[int, tuple[list[str], list[str]]] = field(default_factory=dict)
    started: bool = False

    def send(self, kind: str, payload: bytes = b"") -> None:
        with self.lock:
            self.sock.sendall(struct.pack(">HB", len(payload) + 3, ord(kind)) + payload)


class UrRtdePeer:
    """A kinematic UR5e behind the RTDE, dashboard, script and Robotiq ports on `host` (loopback only)."""

    def __init__(
        self,
        host: str | None = None,
        tick: float = 0.002,
        unlock_delay: float = 1.0,
        serial_number: str = "20235500000",
    ) -> None:
        self.host = host or free_loopback_address()
        if not self.host.startswith("127."):
            raise ValueError("the peer serves loopback addresses only")
        self.tick = tick
        self.unlock_delay = unlock_delay
        self.serial_number = serial_number
        self.arm = ArmModel()
        self.lock = threading.RLock()
        self.robot_mode = ROBOT_MODE_RUNNING
        self.safety_mode = SAFETY_NORMAL
        self.protective_stop_at: float | None = None
        self.program_running = False
        self.program_text = ""
        self.runtime_state = RUNTIME_STOPPED
        self.scripts_received = 0
        self.messages: list[str] = []  # the emulated script's textmsg lines and the peer's notes
        self.commands_seen: list[int] = []
        self.in_int = [0] * 48
        self.in_double = [0.0] * 48
        self.out_int = [0] * 48
        self.out_double = [0.0] * 48
        self._input_owner: dict[str, _RtdeClient] = {}
        self._executing = False
        self._mode = "idle"  # idle | servo | speed | stop | move
        self._servo = (np.zeros(6), 0.002, 0.1, 300.0)
        self._speed = (np.zeros(6), 0.5, 0.0, 0.0)  # twist, acc, duration, started at
        self._stop_acc = 10.0
        self._move = (np.zeros(6), 0.25, 1.2)
        self.gripper = {
            "ACT": 0,
            "GTO": 0,
            "POS": 0,
            "PRE": 0,
            "SPE": 255,
            "FOR": 150,
            "STA": 0,
            "OBJ": 0,
            "FLT": 0,
        }
        self._gripper_pos = 0.0
        self._clients: list[_RtdeClient] = []
        self._sockets: list[socket.socket] = []
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._offline = threading.Event()
        self._t0 = time.monotonic()
        self._model_time = 0.0

    # ---- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> UrRtdePeer:
        handlers: dict[int, Callable[[socket.socket], None]] = {
            RTDE_PORT: self._serve_rtde,
            DASHBOARD_PORT: self._serve_dashboard,
            ROBOTIQ_PORT: self._serve_robotiq,
        }
        for port in SCRIPT_PORTS:
            handlers[port] = self._serve_script
        for port, handler in handlers.items():
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((self.host, port))
            srv.listen(8)
            srv.settimeout(0.2)
            self._listeners.append(srv)
            self._spawn(self._accept_loop, srv, handler)
        self._spawn(self._control_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._close_all()
        for t in self._threads:
            t.join(timeout=2.0)

    def __enter__(self) -> UrRtdePeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def disconnect(self) -> None:
        """The network goes: every connection and listener closes and nothing answers any more, while the
        controller itself carries on (the running script keeps servoing its last target, as on the robot)."""
        self._offline.set()
        self._close_all()

    def _close_all(self) -> None:
        for s in [*self._listeners, *self._sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._listeners.clear()
        self._sockets.clear()

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self, srv: socket.socket, handler: Callable[[socket.socket], None]) -> None:
        while not (self._stop.is_set() or self._offline.is_set()):
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)  # blocking: an accepted socket does not take over the listener's timeout
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets.append(conn)
            self._spawn(self._guarded, handler, conn)

    def _guarded(self, handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
        try:
            handler(conn)
        except (ConnectionError, OSError, struct.error):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    # ---- fault injection -----------------------------------------------------------------------------------

    def protective_stop(self) -> None:
        with self.lock:
            self.safety_mode = SAFETY_PROTECTIVE_STOP
            self.protective_stop_at = time.monotonic()
            self._end_program("protective stop")

    def emergency_stop(self) -> None:
        with self.lock:
            self.safety_mode = SAFETY_ROBOT_EMERGENCY_STOP
            self.robot_mode = ROBOT_MODE_POWER_OFF
            self._end_program("emergency stop")

    def release_emergency_stop(self) -> None:
        with self.lock:
            if self.safety_mode == SAFETY_ROBOT_EMERGENCY_STOP:
                self.safety_mode = SAFETY_NORMAL

    def _end_program(self, why: str) -> None:
        self.arm.halt()
        self._mode = "idle"
        if self.program_running:
            self.messages.append(f"program stopped: {why}")
        self.program_running = False
        self.runtime_state = RUNTIME_STOPPED

    # ---- state ---------------------------------------------------------------------------------------------

    def pose(self) -> np.ndarray:
        with self.lock:
            return self.arm.pose()

    def _robot_status_bits(self) -> int:
        power = self.robot_mode in (ROBOT_MODE_IDLE, ROBOT_MODE_RUNNING)
        return int(power) | (int(self.program_running) << 1)

    def _safety_status_bits(self) -> int:
        bits = 0
        if self.safety_mode == SAFETY_NORMAL:
            bits |= 1
        if self.safety_mode == SAFETY_PROTECTIVE_STOP:
            bits |= 1 << 2
        if self.safety_mode == SAFETY_ROBOT_EMERGENCY_STOP:
            bits |= (1 << 6) | (1 << 7)
        return bits

    def _value(self, name: str) -> object:
        if name == "timestamp":
            return self._model_time  # the time the arm state refers to, as on the controller
        if name in ("actual_q", "target_q"):
            return tuple(self.arm.q)
        if name in ("actual_qd", "target_qd"):
            return tuple(self.arm.qd)
        if name in ("actual_TCP_pose", "target_TCP_pose"):
            return tuple(self.arm.pose())
        if name in ("actual_TCP_speed", "target_TCP_speed"):
            return tuple(self.arm.twist)
        if name == "robot_mode":
            return self.robot_mode
        if name in ("safety_mode", "safety_status"):
            return self.safety_mode
        if name == "runtime_state":
            return self.runtime_state
        if name == "robot_status_bits":
            return self._robot_status_bits()
        if name == "safety_status_bits":
            return self._safety_status_bits()
        if name in ("speed_scaling", "target_speed_fraction"):
            return 1.0
        if name.startswith("output_int_register_"):
            return self.out_int[int(name.rsplit("_", 1)[1])]
        if name.startswith("output_double_register_"):
            return self.out_double[int(name.rsplit("_", 1)[1])]
        return 0

    def _pack_outputs(self, client: _RtdeClient) -> bytes:
        out = [struct.pack(">B", 1)]
        with self.lock:
            for name, typ in zip(client.output_names, client.output_types, strict=True):
                fmt = ">" + _FORMATS[typ]
                value = self._value(name)
                out.append(struct.pack(fmt, *value) if isinstance(value, tuple) else struct.pack(fmt, value))
        return b"".join(out)

    # ---- RTDE ----------------------------------------------------------------------------------------------

    def _serve_rtde(self, conn: socket.socket) -> None:
        client = _RtdeClient(conn)
        self._clients.append(client)
        try:
            while not self._stop.is_set():
                size, kind = struct.unpack(">HB", _recv_exact(conn, 3))
                payload = _recv_exact(conn, size - 3)
                self._rtde_request(client, chr(kind), payload)
        finally:
            with self.lock:
                client.started = False
                for name in [n for n, c in self._input_owner.items() if c is client]:
                    del self._input_owner[name]
            self._clients.remove(client)

    def _rtde_request(self, client: _RtdeClient, kind: str, payload: bytes) -> None:
        if kind == "V":
            (version,) = struct.unpack(">H", payload)
            client.send("V", struct.pack(">B", int(version in (1, 2))))
        elif kind == "v":
            client.send("v", struct.pack(">IIII", *CONTROLLER_VERSION))
        elif kind == "O":
            (client.frequency,) = struct.unpack(">d", payload[:8])
            names = _names(payload[8:])
            types = [_OUTPUT_TYPES.get(n, "NOT_FOUND") for n in names]
            if "NOT_FOUND" not in types:
                client.output_names, client.output_types = names, types
            client.send("O", struct.pack(">B", 1) + ",".join(types).encode())
        elif kind == "I":
            names = _names(payload)
            with self.lock:
                types = []
                for n in names:
                    owner = self._input_owner.get(n)
                    types.append(
                        "IN_USE" if owner not in (None, client) else _INPUT_TYPES.get(n, "NOT_FOUND")
                    )
                ok = all(t in _FORMATS for t in types)
                recipe = len(client.inputs) + 1 if ok else 0
                if ok:
                    client.inputs[recipe] = (names, types)
                    for n in names:
                        self._input_owner[n] = client
            client.send("I", struct.pack(">B", recipe) + ",".join(types).encode())
        elif kind == "S":
            ok = bool(client.output_names) or bool(client.inputs)
            client.send("S", struct.pack(">B", int(ok)))
            if ok and not client.started:
                client.started = True
                if client.output_names:
                    self._spawn(self._stream_outputs, client)
        elif kind == "P":
            client.started = False
            client.send("P", struct.pack(">B", 1))
        elif kind == "U":
            self._rtde_inputs(client, payload)
        elif kind == "M":
            pass  # a client's text message: the controller logs it
        else:
            self.messages.append(f"unknown RTDE package {kind!r}")

    def _rtde_inputs(self, client: _RtdeClient, payload: bytes) -> None:
        recipe = payload[0]
        if recipe not in client.inputs:
            self.messages.append(f"data package for unknown input recipe {recipe}")
            return
        names, types = client.inputs[recipe]
        offset = 1
        with self.lock:
            for name, typ in zip(names, types, strict=True):
                fmt = ">" + _FORMATS[typ]
                values = struct.unpack_from(fmt, payload, offset)
                offset += struct.calcsize(fmt)
                if name.startswith("input_int_register_"):
                    self.in_int[int(name.rsplit("_", 1)[1])] = int(values[0])
                elif name.startswith("input_double_register_"):
                    self.in_double[int(name.rsplit("_", 1)[1])] = float(values[0])

    def _stream_outputs(self, client: _RtdeClient) -> None:
        period = 1.0 / max(1.0, min(client.frequency, 500.0))
        next_at = time.monotonic()
        while client.started and not self._stop.is_set():
            try:
                client.send("U", self._pack_outputs(client))
            except OSError:
                return
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    # ---- the script server and the emulated control script -------------------------------------------------

    def _serve_script(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                buf += chunk
                continue
            if buf:  # a pause after data: the program text is complete
                self._load_program(buf.decode(errors="replace"))
                buf = b""
        if buf:
            self._load_program(buf.decode(errors="replace"))

    def _load_program(self, text: str) -> None:
        with self.lock:
            self.scripts_received += 1
            self.program_text = text
            if "def rtde_control():" not in text or "RTDE Control script - Main loop" not in text:
                self.messages.append("received a script that is not ur_rtde's control script; not run")
                return
            if self.safety_mode != SAFETY_NORMAL or self.robot_mode != ROBOT_MODE_RUNNING:
                self.messages.append("program refused: robot not running / safety mode not normal")
                return
            self.program_running = True
            self.runtime_state = RUNTIME_PLAYING
            self._executing = False
            self._mode = "idle"
            self.out_int[0] = 1  # signal_ready()

    def _control_loop(self) -> None:
        next_at = last = time.monotonic()
        while not self._stop.is_set():
            with self.lock:
                # Integrate all the time that passed, in steps of at most one tick: when a loaded machine runs
                # this loop late, the arm must neither fall behind its target in wall time (and then chase it
                # faster than anything commanded) nor take one long, unstable step.
                now = time.monotonic()
                elapsed = min(max(now - last, 1e-6), 0.2)
                last = now
                if self.program_running:
                    self._script_cycle()
                steps = max(1, math.ceil(elapsed / self.tick - 1e-9))
                for _ in range(steps):
                    self._move_arm(elapsed / steps)
                    self._move_gripper(elapsed / steps)
                self._model_time = now - self._t0
            next_at += self.tick
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def _script_cycle(self) -> None:
        cmd = self.in_int[0]
        if cmd in _REALTIME_COMMANDS:
            self._process(cmd)
            self.out_int[0] = 1
        elif cmd == 0:
            self._executing = False
            self.out_int[0] = 1
        elif not self._executing:
            self._executing = True
            self._process(cmd)
            if self.program_running and cmd != 255 and self._mode != "move":
                self.out_int[0] = 2  # signal_done_with_cmd(); a moveL signals it once there

    def _process(self, cmd: int) -> None:
        if not self.commands_seen or self.commands_seen[-1] != cmd:
            self.commands_seen.append(cmd)
        d = self.in_double
        if cmd == 24:  # servoL(pose, v, a, time, lookahead, gain)
            self._servo = (np.array(d[0:6]), d[8], d[9], d[10])
            self._mode = "servo"
        elif cmd == 10:  # speedL(xd, a, t)
            if self._mode != "speed" or not np.allclose(self._speed[0], d[0:6]):
                self._speed = (np.array(d[0:6]), d[6], d[7], time.monotonic())
            self._mode = "speed"
        elif cmd in (15, 16, 33):  # speedStop / servoStop (the thread is killed) / stopL: decelerate
            self._stop_acc = d[0] if d[0] > 0 else 10.0
            self._mode = "stop"
        elif cmd == 3:  # moveL(pose, v, a, async): blocking here, the script signals done when there
            self._move = (np.array(d[0:6]), d[6], d[7])
            self._mode = "move"
            self._executing = True
        elif cmd == 31:
            self.messages.append("protective_stop")
            self.protective_stop()
        elif cmd == 255:
            self.messages.append("Received stop script!")
            self._end_program("stop script")
        else:
            self.messages.append(f"command {cmd} is not emulated by the peer")
            self._end_program(f"unsupported command {cmd}")

    def _move_arm(self, dt: float) -> None:
        arm = self.arm
        if self.safety_mode != SAFETY_NORMAL or self.robot_mode != ROBOT_MODE_RUNNING:
            arm.halt()
            return
        if not self.program_running and self._mode != "stop":
            self._mode = "stop" if np.any(arm.twist) else "idle"
        if self._mode == "servo":
            target, _, lookahead, _ = self._servo
            err = pose_error_twist(arm.pose(), target)
            arm.step(err / max(lookahead, 0.03), dt)
        elif self._mode == "speed":
            twist, acc, duration, since = self._speed
            if duration > 0 and time.monotonic() - since > duration:
                twist = np.zeros(6)
            arm.step(twist, dt, acc=acc if acc > 0 else None)
        elif self._mode == "move":
            target, vel, acc = self._move
            err = pose_error_twist(arm.pose(), target)
            dist = float(np.linalg.norm(err[:3]))
            if dist < 1e-4 and float(np.linalg.norm(err[3:])) < 1e-3:
                arm.halt()
                self._mode = "idle"
                if self.program_running:
                    self.out_int[0] = 2
                return
            speed = min(vel, math.sqrt(2 * acc * dist), dist / dt)
            scale = speed / dist if dist > 1e-9 else 0.0
            arm.step(np.concatenate([err[:3] * scale, err[3:] / max(dt * 20, 1e-3)]), dt, acc=acc)
        elif self._mode == "stop":
            arm.step(np.zeros(6), dt, acc=self._stop_acc)
            if not np.any(np.abs(arm.twist) > 1e-9):
                arm.halt()
                self._mode = "idle"
        else:
            arm.halt()

    # ---- dashboard -----------------------------------------------------------------------------------------

    def _serve_dashboard(self, conn: socket.socket) -> None:
        conn.sendall(b"Connected: Universal Robots Dashboard Server\n")
        for line in self._lines(conn):
            conn.sendall((self._dashboard(line.strip()) + "\n").encode())

    def _lines(self, conn: socket.socket) -> Iterator[str]:
        buf = b""
        while not self._stop.is_set():
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode(errors="replace")

    def _dashboard(self, cmd: str) -> str:
        with self.lock:
            lower = cmd.lower()
            if cmd == "PolyscopeVersion":
                return "URSoftware 5.11.1.108318 (Mar 22 2021)"
            if lower == "get serial number":
                return self.serial_number
            if lower == "is in remote control":
                return "true"
            if lower == "robotmode":
                names = {
                    ROBOT_MODE_POWER_OFF: "POWER_OFF",
                    ROBOT_MODE_IDLE: "IDLE",
                    ROBOT_MODE_RUNNING: "RUNNING",
                }
                return f"Robotmode: {names[self.robot_mode]}"
            if lower == "safetystatus" or lower == "safetymode":
                names = {
                    SAFETY_NORMAL: "NORMAL",
                    SAFETY_PROTECTIVE_STOP: "PROTECTIVE_STOP",
                    SAFETY_ROBOT_EMERGENCY_STOP: "ROBOT_EMERGENCY_STOP",
                }
                return f"Safetystatus: {names[self.safety_mode]}"
            if lower == "programstate":
                return "PLAYING rtde_control" if self.program_running else "STOPPED <unnamed>"
            if lower == "power on":
                if self.safety_mode == SAFETY_ROBOT_EMERGENCY_STOP:
                    return "Failed to execute: power on"
                if self.robot_mode == ROBOT_MODE_POWER_OFF:
                    self.robot_mode = ROBOT_MODE_IDLE
                return "Powering on"
            if lower == "power off":
                self.robot_mode = ROBOT_MODE_POWER_OFF
                self._end_program("power off")
                return "Powering off"
            if lower == "brake release":
                if self.robot_mode == ROBOT_MODE_IDLE:
                    self.robot_mode = ROBOT_MODE_RUNNING
                return "Brake releasing"
            if lower == "unlock protective stop":
                if self.safety_mode != SAFETY_PROTECTIVE_STOP:
                    return "Protective stop releasing"  # the controller answers so when none is active too
                assert self.protective_stop_at is not None
                if time.monotonic() - self.protective_stop_at < self.unlock_delay:
                    return (
                        f"Cannot unlock protective stop until {self.unlock_delay:g}s after occurrence. "
                        "Always inspect cause of protective stop before unlocking"
                    )
                self.safety_mode = SAFETY_NORMAL
                return "Protective stop releasing"
            if lower == "close safety popup":
                return "closing safety popup"
            if lower == "restart safety":
                return "Restarting safety"
            if lower == "stop":
                if not self.program_running:
                    return "Failed to execute: stop"
                self._end_program("dashboard stop")
                return "Stopped"
            if lower == "pause":
                return "Failed to execute: pause"
            if lower == "play":
                return "Failed to execute: play"
            return f"could not understand: '{cmd}'"

    # ---- Robotiq URCap socket ------------------------------------------------------------------------------

    def _serve_robotiq(self, conn: socket.socket) -> None:
        for line in self._lines(conn):
            words = line.strip().split()
            if not words:
                continue
            with self.lock:
                if words[0] == "SET" and len(words) >= 3 and len(words) % 2 == 1:
                    for var, val in zip(words[1::2], words[2::2], strict=True):
                        # SET POS is the request (read back as PRE); GET POS is where the fingers are.
                        self.gripper["PRE" if var == "POS" else var] = int(val)
                        if var == "ACT":
                            self.gripper["STA"] = 3 if int(val) else 0
                    reply = "ack"
                elif words[0] == "GET" and len(words) == 2:
                    if words[1] == "POS":
                        self.gripper["POS"] = round(self._gripper_pos)
                    reply = f"{words[1]} {self.gripper.get(words[1], 0)}"
                else:
                    reply = "?"
            conn.sendall((reply + "\n").encode())

    def _move_gripper(self, dt: float) -> None:
        g = self.gripper
        if not (g["ACT"] and g["GTO"]):
            return
        speed = 255.0 / (0.8 - 0.5 * g["SPE"] / 255.0)  # counts per second: a full stroke in 0.8 .. 0.3 s
        target = float(max(0, min(255, g["PRE"])))
        delta = target - self._gripper_pos
        step = speed * dt
        self._gripper_pos = target if abs(delta) <= step else self._gripper_pos + math.copysign(step, delta)
        g["OBJ"] = 3 if self._gripper_pos == target else 0


# ---- the peer in its own process ---------------------------------------------------------------------------


def _serve(conn: object, kwargs: dict[str, object]) -> None:
    peer = UrRtdePeer(**kwargs)  # type: ignore[arg-type]
    try:
        peer.start()
    except OSError as exc:
        conn.send(("error", f"cannot bind the UR ports on {peer.host}: {exc}"))  # type: ignore[attr-defined]
        return
    conn.send(("ok", peer.host))  # type: ignore[attr-defined]
    try:
        while True:
            try:
                name, args = conn.recv()  # type: ignore[attr-defined]
            except EOFError:
                break
            if name == "stop":
                break
            try:
                attr = getattr(peer, name)
                with peer.lock:
                    result = attr(*args) if callable(attr) else attr
                conn.send(("ok", result))  # type: ignore[attr-defined]
            except Exception as exc:  # reported to the caller, who raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
    finally:
        peer.stop()


class PeerProcess:
    """`UrRtdePeer` in a spawned child process; `call(name, *args)` runs a method (or reads an attribute)."""

    def __init__(self, timeout: float = 20.0, **kwargs: object) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._timeout = timeout
        self.proc = ctx.Process(target=_serve, args=(child, kwargs), daemon=True)
        self.proc.start()
        self.host = str(self._reply())

    def _reply(self) -> object:
        if not self._conn.poll(self._timeout):
            self.kill()
            raise RuntimeError("the UR protocol peer did not answer")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(str(value))
        return value

    def call(self, name: str, *args: object) -> object:
        self._conn.send((name, args))
        return self._reply()

    def kill(self) -> None:
        """The controller dies at once (no orderly close: the sockets vanish with the process)."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5.0)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(("stop", ()))
            self.proc.join(timeout=5.0)
        self.kill()
        self._conn.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
