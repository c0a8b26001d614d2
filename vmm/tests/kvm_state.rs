//! Saving and restoring vCPU and VM state on this host's KVM: a vCPU stopped in the middle of a
//! guest loop is saved, restored into a second VM and carries on where it stopped; the VM's
//! irqchips, PIT and clock come back; what KVM will not take is refused by name.
//!
//! Needs `/dev/kvm`; without it each test fails saying so, unless `PANGOLIN_EXPECTED_SKIPS`
//! names it.
#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_irqchip, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use pangolin_vmm::arch::cpuid;
use pangolin_vmm::arch::regs::{self, BootEntry};
use pangolin_vmm::memory::{self, GuestMemoryMmap};
use pangolin_vmm::vstate::vcpu;
use pangolin_vmm::vstate::vcpu_state::{
    kvmclock_ctrl, msr_indices_to_save, xsave_size, MsrValue, StateError, VcpuState,
};
use pangolin_vmm::vstate::vm::Vm;
use pangolin_vmm::vstate::vm_state::{VmState, VmStateError};
use vm_memory::{Bytes, GuestAddress};

const CODE_ADDR: u64 = 0x100_0000;
const PORT: u16 = 0x500;
const MSR_IA32_TSC: u32 = 0x10;
/// No such MSR on any x86 CPU (and outside every range KVM emulates).
const UNKNOWN_MSR: u32 = 0x4b56_4dee;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Where the test guest's kvmclock page is (unused by its code).
const KVMCLOCK_PAGE: u64 = 0x180_0000;

/// `mov dx, 0x500; 1: in al, dx; add al, 1; out dx, al; jmp 1b`: reads a byte from the port and
/// writes it back plus one, forever.
const GUEST_LOOP: [u8; 10] = [0x66, 0xba, 0x00, 0x05, 0xec, 0x04, 0x01, 0xee, 0xeb, 0xfa];

/// `/dev/kvm`, or None when the test may be skipped ([`common::cannot_run`] fails it otherwise).
fn kvm(test: &str) -> Option<Kvm> {
    if !Path::new("/dev/kvm").exists() {
        common::cannot_run(test, "/dev/kvm does not exist on this machine");
        return None;
    }
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            common::cannot_run(test, &format!("opening /dev/kvm: {e}"));
            None
        }
    }
}

/// A VM with 32 MiB holding the long-mode boot tables and [`GUEST_LOOP`] at [`CODE_ADDR`].
fn guest_vm(kvm: Kvm) -> (Vm, GuestMemoryMmap, [u64; 5], BootEntry) {
    let mem = memory::create(32).expect("guest memory");
    let entry = BootEntry::Linux64 {
        entry: CODE_ADDR,
        zero_page: 0x7000,
    };
    let gdt = regs::write_tables(&mem, entry).expect("boot tables");
    mem.write_slice(&GUEST_LOOP, GuestAddress(CODE_ADDR))
        .expect("guest code");
    let vm = Vm::with_kvm(kvm, &mem).expect("VM");
    (vm, mem, gdt, entry)
}

/// Runs `fd` to its next exit at [`PORT`]: a read is answered with `value` (which reaches the
/// guest's AL on the next KVM_RUN) and gives None, a write gives the byte written.
fn step(fd: &mut VcpuFd, value: u8) -> Option<u8> {
    match fd.run().expect("KVM_RUN") {
        VcpuExit::IoIn(PORT, data) => {
            data[0] = value;
            None
        }
        VcpuExit::IoOut(PORT, data) => Some(data[0]),
        other => panic!("unexpected exit {other:?}"),
    }
}

/// Completes the last exit the way a snapshot must before saving: KVM_RUN with
/// `immediate_exit`, which finishes the IN (stores the value, advances RIP) and returns EINTR
/// without running on. Without it the state has the IN still to do, and the restored guest asks
/// its new VMM again: the value the template's VMM gave (a byte popped off a FIFO) is lost.
fn finish_exit(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let r = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => {}
        other => panic!("KVM_RUN with immediate_exit: {other:?}"),
    }
}

/// The top-level fields of `a` and `b` (as JSON) that differ, by name.
fn differing_fields(a: &VcpuState, b: &VcpuState) -> Vec<String> {
    let a = serde_json::to_value(a).expect("json");
    let b = serde_json::to_value(b).expect("json");
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        panic!("state is not a JSON object");
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn vcpu_state_restored_into_a_second_vm_carries_on_where_it_stopped() {
    let test = "vcpu_state_restored_into_a_second_vm_carries_on_where_it_stopped";
    let Some(kvm1) = kvm(test) else { return };
    let msr_indices = msr_indices_to_save(&kvm1).expect("MSR index list");
    let listed = kvm1.get_msr_index_list().expect("KVM_GET_MSR_INDEX_LIST");
    let dropped: Vec<u32> = listed
        .as_slice()
        .iter()
        .copied()
        .filter(|i| !msr_indices.contains(i))
        .collect();
    eprintln!("MSRs saved: {msr_indices:x?}; listed by KVM but not saved: {dropped:x?}");
    let base_cpuid = cpuid::supported(&kvm1).expect("supported CPUID");
    let (vm1, _mem1, gdt, entry) = guest_vm(kvm1);
    let mut fd1 = vcpu::create(&vm1, &base_cpuid, 0, 1, entry, &gdt).expect("vCPU");
    assert_eq!(step(&mut fd1, 1), None);
    assert_eq!(step(&mut fd1, 0), Some(2));
    // Stopped at an IN answered with 41: the snapshot is taken there.
    assert_eq!(step(&mut fd1, 41), None);
    finish_exit(&mut fd1);
    // Debug registers the guest could have set (no breakpoint enabled: DR7 only has bit 10).
    let mut dr = fd1.get_debug_regs().expect("KVM_GET_DEBUGREGS");
    dr.db = [0x1000, 0x2000, 0x3000, 0x4000];
    fd1.set_debug_regs(&dr).expect("KVM_SET_DEBUGREGS");
    // kvmclock enabled, as a Linux guest does it (MSR_KVM_SYSTEM_TIME_NEW = its page | enable):
    // carried by the paravirtual MSRs, it is what KVM_KVMCLOCK_CTRL needs.
    let kvmclock = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_KVM_SYSTEM_TIME_NEW,
        data: KVMCLOCK_PAGE | 1,
        ..Default::default()
    }])
    .expect("MSR list");
    assert_eq!(fd1.set_msrs(&kvmclock).expect("KVM_SET_MSRS"), 1);

    let saved = VcpuState::save(&vm1.fd, &fd1, &msr_indices).expect("save");
    eprintln!(
        "XSAVE: KVM_CAP_XSAVE2 {} bytes, saved {} bytes; TSC {} kHz; {} CPUID entries",
        vm1.fd.check_extension_int(Cap::Xsave2),
        saved.xsave.len() * 4,
        saved.tsc_khz,
        saved.cpuid.len()
    );
    assert_eq!(saved.regs.rax & 0xff, 41);
    assert_eq!(
        saved.msrs.iter().map(|m| m.index).collect::<Vec<_>>(),
        msr_indices
    );
    assert!(saved.xsave.len() * 4 >= xsave_size(&vm1.fd));
    // Through the snapshot format's serde and back.
    let saved: VcpuState =
        serde_json::from_str(&serde_json::to_string(&saved).expect("serialize")).expect("parse");

    let (vm2, _mem2, _, _) = guest_vm(Kvm::new().expect("/dev/kvm"));
    let mut fd2 = vm2.fd.create_vcpu(0).expect("KVM_CREATE_VCPU");
    saved.restore(&vm2.fd, &fd2).expect("restore");
    assert!(
        kvmclock_ctrl(&fd2).expect("KVM_KVMCLOCK_CTRL"),
        "kvmclock not restored"
    );
    let again = VcpuState::save(&vm2.fd, &fd2, &msr_indices).expect("save again");

    // Everything reads back as saved but the MSRs: the TSC kept counting in between. (The TSC
    // deadline, saved as 0, is written back as the saved TSC, and KVM ignores that while the
    // LAPIC timer is not in TSC-deadline mode: it reads back 0.)
    assert_eq!(differing_fields(&saved, &again), ["msrs"]);
    let deadline = |s: &VcpuState| s.msrs.iter().find(|m| m.index == 0x6e0).map(|m| m.data);
    assert_eq!((deadline(&saved), deadline(&again)), (Some(0), Some(0)));
    assert_eq!(saved.msrs.len(), again.msrs.len());
    for (s, a) in saved.msrs.iter().zip(&again.msrs) {
        assert_eq!(s.index, a.index);
        match s.index {
            MSR_IA32_TSC => assert!(a.data >= s.data, "TSC went back: {s:x?} -> {a:x?}"),
            _ => assert_eq!(s, a, "MSR {:#x} changed", s.index),
        }
    }

    // The restored guest goes on with the value its template read: no second IN.
    assert_eq!(step(&mut fd2, 0), Some(42));
    assert_eq!(step(&mut fd2, 7), None);
    assert_eq!(step(&mut fd2, 0), Some(8));
    assert_eq!(
        step(&mut fd1, 0),
        Some(42),
        "the template itself goes on too"
    );
}

#[test]
fn vm_state_round_trips_and_the_clock_does_not_jump() {
    let test = "vm_state_round_trips_and_the_clock_does_not_jump";
    let Some(kvm1) = kvm(test) else { return };
    let (vm1, _mem1, _, _) = guest_vm(kvm1);
    // State no fresh VM has: PIT channel 0 programmed, the PIC master's mask, an IOAPIC route,
    // the clock at 5 s.
    let mut pit = vm1.fd.get_pit2().expect("KVM_GET_PIT2");
    pit.channels[0].count = 1193;
    pit.channels[0].mode = 2;
    pit.channels[0].rw_mode = 3;
    vm1.fd.set_pit2(&pit).expect("KVM_SET_PIT2");
    let chip = |id: u32, edit: &dyn Fn(&mut kvm_irqchip)| {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm1.fd.get_irqchip(&mut c).expect("KVM_GET_IRQCHIP");
        edit(&mut c);
        vm1.fd.set_irqchip(&c).expect("KVM_SET_IRQCHIP");
    };
    chip(KVM_IRQCHIP_PIC_MASTER, &|c| c.chip.pic.imr = 0xfa);
    chip(KVM_IRQCHIP_PIC_SLAVE, &|c| c.chip.pic.imr = 0x7f);
    // Line 5 to vector 0x35, level-triggered, unmasked.
    // SAFETY: the IOAPIC chip id selects the union's IOAPIC member, which KVM filled in.
    chip(KVM_IRQCHIP_IOAPIC, &|c| unsafe {
        c.chip.ioapic.redirtbl[5].bits = 0x0000_0000_0000_8035;
    });
    let clock = kvm_bindings::kvm_clock_data {
        clock: 5_000_000_000,
        ..Default::default()
    };
    vm1.fd.set_clock(&clock).expect("KVM_SET_CLOCK");

    let mut saved = VmState::save(&vm1.fd).expect("save");
    let saved_clock = saved.clock.clock;
    assert!(saved_clock >= 5_000_000_000);
    // Even a state saying "realtime an hour ago" must not move the clock on restore.
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    saved.clock.flags |= KVM_CLOCK_REALTIME;
    saved.clock.realtime = u64::try_from(
        hour_ago
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    )
    .expect("ns");
    let saved: VmState =
        serde_json::from_str(&serde_json::to_string(&saved).expect("serialize")).expect("parse");

    let (vm2, _mem2, _, _) = guest_vm(Kvm::new().expect("/dev/kvm"));
    saved.restore(&vm2.fd).expect("restore");
    let again = VmState::save(&vm2.fd).expect("save again");

    let json = |c: &kvm_irqchip| serde_json::to_string(c).expect("json");
    assert_eq!(json(&again.pic_master), json(&saved.pic_master));
    assert_eq!(json(&again.pic_slave), json(&saved.pic_slave));
    assert_eq!(json(&again.ioapic), json(&saved.ioapic));
    // SAFETY: the chip ids say which union member KVM filled in.
    unsafe {
        assert_eq!(again.pic_master.chip.pic.imr, 0xfa);
        assert_eq!(again.ioapic.chip.ioapic.redirtbl[5].bits, 0x8035);
    }
    // The PIT comes back whole except the time each channel's count was loaded: KVM reloads
    // the counters on KVM_SET_PIT2 and stamps them with the host's time of the restore.
    assert_eq!(again.pit.flags, saved.pit.flags);
    for (s, a) in saved.pit.channels.iter().zip(&again.pit.channels) {
        let mut a = *a;
        a.count_load_time = s.count_load_time;
        assert_eq!(a, *s);
    }
    assert_eq!(again.pit.channels[0].count, 1193);
    // The clock carries on from the saved value: not back, and not an hour on.
    let moved = again
        .clock
        .clock
        .checked_sub(saved_clock)
        .expect("clock went back");
    assert!(
        moved < 1_000_000_000,
        "clock moved {moved} ns over the restore"
    );
}

#[test]
fn unknown_msr_is_refused_naming_it() {
    let test = "unknown_msr_is_refused_naming_it";
    let Some(kvm1) = kvm(test) else { return };
    let msr_indices = msr_indices_to_save(&kvm1).expect("MSR index list");
    let base_cpuid = cpuid::supported(&kvm1).expect("supported CPUID");
    let (vm, _mem, gdt, entry) = guest_vm(kvm1);
    let fd = vcpu::create(&vm, &base_cpuid, 0, 1, entry, &gdt).expect("vCPU");

    // Saving: the read stops at the unknown MSR, also past the first call's 255.
    let mut indices = vec![0x174; 300];
    indices[280] = UNKNOWN_MSR;
    match VcpuState::save(&vm.fd, &fd, &indices) {
        Err(StateError::MsrRead(UNKNOWN_MSR)) => {}
        other => panic!("save with an unknown MSR: {other:?}"),
    }
    let e = VcpuState::save(&vm.fd, &fd, &[0x174, UNKNOWN_MSR]).expect_err("unknown MSR");
    assert_eq!(e.to_string(), "KVM_GET_MSRS could not read MSR 0x4b564dee");

    // Restoring: the write stops at it.
    let mut state = VcpuState::save(&vm.fd, &fd, &msr_indices).expect("save");
    state.msrs.insert(
        1,
        MsrValue {
            index: UNKNOWN_MSR,
            data: 1,
        },
    );
    let fd2 = vm.fd.create_vcpu(1).expect("KVM_CREATE_VCPU");
    let e = state.restore(&vm.fd, &fd2).expect_err("unknown MSR");
    assert!(matches!(e, StateError::MsrWrite(UNKNOWN_MSR)), "{e:?}");
    assert_eq!(e.to_string(), "KVM_SET_MSRS could not write MSR 0x4b564dee");
}

#[test]
fn broken_states_are_refused_by_name() {
    let test = "broken_states_are_refused_by_name";
    let Some(kvm1) = kvm(test) else { return };
    let msr_indices = msr_indices_to_save(&kvm1).expect("MSR index list");
    let (vm, _mem, _, _) = guest_vm(kvm1);
    let fd = vm.fd.create_vcpu(0).expect("KVM_CREATE_VCPU");
    // A vCPU whose guest never enabled kvmclock: nothing to tell it, and no error.
    assert!(!kvmclock_ctrl(&fd).expect("KVM_KVMCLOCK_CTRL"));
    let state = VcpuState::save(&vm.fd, &fd, &msr_indices).expect("save");

    // An XSAVE area shorter than KVM reads would let KVM read past it.
    let mut short = state.clone();
    short.xsave.truncate(100);
    let e = short.restore(&vm.fd, &fd).expect_err("short XSAVE");
    assert!(
        matches!(e, StateError::XsaveSize { saved: 400, needed } if needed == xsave_size(&vm.fd)),
        "{e:?}"
    );

    // An irqchip saved under the wrong name.
    let mut vm_state = VmState::save(&vm.fd).expect("save VM");
    vm_state.pic_slave = vm_state.ioapic;
    let e = vm_state.restore(&vm.fd).expect_err("wrong chip");
    assert!(
        matches!(
            e,
            VmStateError::WrongChip {
                field: "pic_slave",
                expected: 1,
                found: 2
            }
        ),
        "{e:?}"
    );
}

/// A saved TSC frequency this vCPU does not have is set with KVM_SET_TSC_KHZ. Without TSC
/// scaling KVM takes a faster rate (catching the guest TSC up at each entry) but refuses a slower
/// one, and the restore says so naming the ioctl.
#[test]
fn different_tsc_frequency_is_set_or_refused_by_name() {
    let test = "different_tsc_frequency_is_set_or_refused_by_name";
    let Some(kvm1) = kvm(test) else { return };
    let msr_indices = msr_indices_to_save(&kvm1).expect("MSR index list");
    let scaling = kvm1.check_extension(Cap::TscControl);
    let (vm, _mem, _, _) = guest_vm(kvm1);
    let fd = vm.fd.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let state = VcpuState::save(&vm.fd, &fd, &msr_indices).expect("save");
    let host = state.tsc_khz;
    // 10% off either way: well outside KVM's 250 ppm tolerance.
    let at = |id: u64, tsc_khz: u32| {
        let fd = vm.fd.create_vcpu(id).expect("KVM_CREATE_VCPU");
        let state = VcpuState {
            tsc_khz,
            ..state.clone()
        };
        let r = state.restore(&vm.fd, &fd);
        eprintln!("KVM_CAP_TSC_CONTROL {scaling}; host {host} kHz; restore at {tsc_khz}: {r:?}");
        (r, fd)
    };
    let faster = host / 10 * 11;
    let (r, fd_fast) = at(1, faster);
    r.expect("restore at a faster TSC");
    assert_eq!(fd_fast.get_tsc_khz().expect("KVM_GET_TSC_KHZ"), faster);

    let slower = host / 10 * 9;
    let (r, fd_slow) = at(2, slower);
    if scaling {
        r.expect("restore at a slower TSC with TSC scaling");
        assert_eq!(fd_slow.get_tsc_khz().expect("KVM_GET_TSC_KHZ"), slower);
    } else {
        let e = r.expect_err("no TSC scaling on this host");
        assert!(
            matches!(e, StateError::TscKhz { saved, host: h, .. } if saved == slower && h == host),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("KVM_SET_TSC_KHZ"), "{e}");
    }
}

/// A vCPU's leaf 1 announces the TSC-deadline timer exactly when this KVM emulates it (the guest
/// then skips calibrating its APIC timer against the PIT).
#[test]
fn vcpus_have_the_tsc_deadline_timer_when_kvm_emulates_it() {
    let Some(kvm) = kvm("vcpus_have_the_tsc_deadline_timer_when_kvm_emulates_it") else {
        return;
    };
    let cpuid = cpuid::supported(&kvm).expect("supported cpuid");
    let leaf1 = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .expect("leaf 1");
    assert_eq!(
        leaf1.ecx & (1 << 24) != 0,
        kvm.check_extension(Cap::TscDeadlineTimer),
        "leaf 1 ECX {:#x}",
        leaf1.ecx
    );
}
