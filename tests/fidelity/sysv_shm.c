/* SysV shared memory: a keyed segment (mode 0640, owner nobody, 3 pages with a pattern) attached
 * twice — read-write and SHM_RDONLY — one attachment split by mprotect; and a private segment
 * marked removed (IPC_RMID) but still attached. After the restore: the contents, the two
 * attachments alias one segment, shmget(key) finds the same id, IPC_STAT shows key, size, mode,
 * owner and SHM_DEST on the removed one, which still works. Prints "shm <keyed id> <key>
 * <removed id>" before READY for the driver. Removes the keyed segment at the end. */
#include "fidelity.h"
#include <sys/mman.h>
#include <sys/shm.h>

#define SIZE (3 * 4096)

int main(void) {
    fid_init();
    key_t key = 0x44560000 | (getpid() & 0xffff);
    int id = shmget(key, SIZE, IPC_CREAT | IPC_EXCL | 0640);
    int rid = shmget(IPC_PRIVATE, 5000, IPC_CREAT | 0600);
    if (id < 0 || rid < 0) { printf("FAIL shmget: %s\n", strerror(errno)); return 2; }
    struct shmid_ds ds;
    shmctl(id, IPC_STAT, &ds);
    ds.shm_perm.uid = 65534;
    ds.shm_perm.gid = 65534;
    if (shmctl(id, IPC_SET, &ds)) { printf("FAIL IPC_SET: %s\n", strerror(errno)); return 2; }
    unsigned char *rw = shmat(id, NULL, 0), *ro = shmat(id, NULL, SHM_RDONLY), *rm = shmat(rid, NULL, 0);
    if (rw == (void *)-1 || ro == (void *)-1 || rm == (void *)-1) { printf("FAIL shmat: %s\n", strerror(errno)); return 2; }
    for (int i = 0; i < SIZE; i++) rw[i] = (unsigned char)(i * 7 + 1);
    for (int i = 0; i < 5000; i++) rm[i] = (unsigned char)(i * 3 + 2);
    mprotect(rw + 4096, 4096, PROT_READ); /* the rw attachment is now three VMAs */
    shmctl(rid, IPC_RMID, NULL);
    printf("shm %d %d %d\n", id, key, rid);
    ready();
    wait_go();

    int bad = 0;
    for (int i = 0; i < SIZE; i++) bad += rw[i] != (unsigned char)(i * 7 + 1) || ro[i] != rw[i];
    CHECK(bad == 0, "%d bytes of the keyed segment differ", bad);
    bad = 0;
    for (int i = 0; i < 5000; i++) bad += rm[i] != (unsigned char)(i * 3 + 2);
    CHECK(bad == 0, "%d bytes of the removed segment differ", bad);
    rw[0] = 0xAA;
    rw[2 * 4096 + 5] = 0xBB;
    CHECK(ro[0] == 0xAA && ro[2 * 4096 + 5] == 0xBB, "the two attachments are not one segment");
    CHECK(shmget(key, 0, 0) == id, "shmget(key) gives %d, not %d", shmget(key, 0, 0), id);
    CHECK(shmctl(id, IPC_STAT, &ds) == 0 && ds.shm_segsz == SIZE && (ds.shm_perm.mode & 0777) == 0640 &&
              ds.shm_perm.uid == 65534 && ds.shm_perm.gid == 65534 && ds.shm_perm.__key == key && ds.shm_nattch == 4 /* a VMA each */,
          "keyed segment: size %zu mode %o uid %u gid %u nattch %lu", ds.shm_segsz, ds.shm_perm.mode,
          ds.shm_perm.uid, ds.shm_perm.gid, (unsigned long)ds.shm_nattch);
    CHECK(shmctl(rid, IPC_STAT, &ds) == 0 && ds.shm_segsz == 5000 && (ds.shm_perm.mode & SHM_DEST) &&
              ds.shm_nattch == 1, "removed segment: size %zu mode %o nattch %lu", ds.shm_segsz, ds.shm_perm.mode,
          (unsigned long)ds.shm_nattch);
    /* The protections: the middle page of rw is read-only, ro is read-only (mprotect to write fails). */
    CHECK(mprotect(ro, 4096, PROT_READ | PROT_WRITE) == -1 && errno == EACCES, "SHM_RDONLY attachment made writable");
    rm[4999] = 9;
    CHECK(shmdt(rm) == 0 && shmctl(rid, IPC_STAT, &ds) == -1, "the removed segment outlived its last attachment");
    CHECK(shmdt(rw) == 0 && shmdt(ro) == 0, "shmdt");
    shmctl(id, IPC_RMID, NULL);
    return finish();
}
