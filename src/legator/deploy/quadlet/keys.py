"""The keys each quadlet type accepts in its own section, and the required ones.

Checked against Podman 5.4's generator (the one ``scripts/install-quadlet.sh`` installs): each
key below passes its ``-dryrun`` (tests/deploy/test_quadlet.py runs it on every [Container]
key). ``RemapUid``/``RemapGid``/``RemapUidSize``/``RemapUsers`` and ``VolatileTmp`` are
deprecated there but still accepted.
"""

from __future__ import annotations

_SHARED = {"ContainersConfModule", "GlobalArgs", "PodmanArgs"}
_REMAP = {"RemapGid", "RemapUid", "RemapUidSize", "RemapUsers"}


def _words(text: str) -> set[str]:
    return set(text.split())


KEYS: dict[str, frozenset[str]] = {
    "Container": frozenset(
        _SHARED
        | _REMAP
        | _words(
            """AddCapability AddDevice AddHost Annotation AutoUpdate CgroupsMode ContainerName
            DNS DNSOption DNSSearch DropCapability Entrypoint Environment EnvironmentFile
            EnvironmentHost Exec ExposeHostPort GIDMap Group GroupAdd HealthCmd HealthInterval
            HealthLogDestination HealthMaxLogCount HealthMaxLogSize HealthOnFailure
            HealthRetries HealthStartPeriod HealthStartupCmd HealthStartupInterval
            HealthStartupRetries HealthStartupSuccess HealthStartupTimeout HealthTimeout
            HostName Image IP IP6 Label LogDriver LogOpt Mask
            Mount Network NetworkAlias NoNewPrivileges Notify PidsLimit Pod PublishPort
            Pull ReadOnly ReadOnlyTmpfs Rootfs RunInit SeccompProfile Secret
            SecurityLabelDisable SecurityLabelFileType SecurityLabelLevel SecurityLabelNested
            SecurityLabelType ServiceName ShmSize StartWithPod StopSignal StopTimeout SubGIDMap
            SubUIDMap Sysctl Timezone Tmpfs UIDMap Ulimit Unmask User UserNS VolatileTmp Volume
            WorkingDir"""
        )
    ),
    "Volume": frozenset(
        _SHARED
        | _words("Copy Device Driver Group Image Label Options ServiceName Type User VolumeName")
    ),
    "Network": frozenset(
        _SHARED
        | _words(
            """DisableDNS DNS Driver Gateway InterfaceName Internal IPAMDriver IPRange IPv6
            Label NetworkDeleteOnStop NetworkName Options ServiceName Subnet"""
        )
    ),
    "Pod": frozenset(
        _SHARED
        | _REMAP
        | _words(
            """AddHost DNS DNSOption DNSSearch GIDMap HostName IP IP6 Label Network
            NetworkAlias PodName PublishPort ServiceName ShmSize SubGIDMap SubUIDMap UIDMap
            UserNS Volume"""
        )
    ),
    "Kube": frozenset(
        _SHARED
        | _REMAP
        | _words(
            """AutoUpdate ConfigMap ExitCodePropagation KubeDownForce LogDriver LogOpt Network
            PublishPort ServiceName SetWorkingDirectory UserNS Yaml"""
        )
    ),
    "Image": frozenset(
        _SHARED
        | _words(
            """AllTags Arch AuthFile CertDir Creds DecryptionKey Image ImageTag OS Pull
            ServiceName TLSVerify Variant"""
        )
    ),
    "Build": frozenset(
        _SHARED
        | _words(
            """Annotation Arch AuthFile DNS DNSOption DNSSearch Environment File ForceRM GroupAdd
            ImageTag Label Network Pull Secret ServiceName SetWorkingDirectory Target TLSVerify
            Variant Volume"""
        )
    ),
}

# (section, one-of keys): at least one key of each tuple must be present.
REQUIRED: dict[str, list[tuple[str, ...]]] = {
    "Container": [("Image", "Rootfs")],
    "Kube": [("Yaml",)],
    "Image": [("Image",)],
    "Build": [("ImageTag",), ("File", "SetWorkingDirectory")],
}

# Sections systemd itself owns; quadlet passes them through.
SYSTEMD_SECTIONS = frozenset({"Unit", "Install", "Service"})
